"""Abstractive summarization of CNN/DailyMail articles into their highlights (TFDS
cnn_dailymail) fine-tuning a pretrained BartForConditionalGeneration, scored by ROUGE-1/2/L/Lsum of
beam-search summaries of the validation set after training.

  --config=finetune/cnn_dailymail_bart:DIR   DIR a BART directory or hub id, e.g.
        facebook/bart-base or facebook/bart-large: the model, its tokenizer (tokenizer.json or
        vocab.json + merges.txt: <s> text </s> on both sides) and its conventions come from DIR:
        the decoder starts from </s> (decoder_start_token_id), the first token generated is <s>
        (forced_bos_token_id) and a summary cut at max_length ends with </s>
        (forced_eos_token_id), with its beam settings
  --config=finetune/cnn_dailymail_bart:tiny  a random tiny BART exported to the temp dir with
        the same conventions in the ids of lmflax's BPE tokenizer (trained on both sides of the
        data; it has no <s>, so nothing is forced first), so that the whole path runs offline
  --config=finetune/cnn_dailymail_bart       bart-large's shapes (12 + 12 layers, d_model
        1024), from scratch (for planning); :base for bart-base's (6 + 6, d_model 768)

The data must be prepared once: lmflax data prepare cnn_dailymail
"""

from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    GenerateConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.configs.finetune import seq2seq_from_checkpoint, tiny_seq2seq_checkpoint
from lmflax.hf import bart

# facebook/bart-large's BartConfig (bart-base: 6 + 6 layers of width 768, 12 heads).
BART_LARGE = dict(
    vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
    decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
    scale_embedding=False, dropout=0.1, attention_dropout=0.0,
)  # fmt: skip
BART_BASE = dict(
    BART_LARGE, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip
# lmflax's BPE tokenizer: <|endoftext|> = 0 ends sequences, <|pad|> = 1 pads. BART's
# conventions in those ids: start from the EOS, end at the limit with it.
TINY = dict(
    BART_LARGE, vocab_size=2048, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0,
    pad_token_id=1, eos_token_id=0, decoder_start_token_id=0, forced_eos_token_id=0,
    num_beams=2, length_penalty=2.0, early_stopping=True, max_length=33,
)  # fmt: skip


def get_config(arg: str | None = None) -> Config:
    tiny = arg == "tiny"
    shapes = BART_BASE if arg == "base" else BART_LARGE
    cfg = Config(
        model=bart.to_config(bart.ARCHS["bart"], shapes, (), "bart"),
        task=TaskConfig(
            name="seq2seq",
            source_key="article",
            target_key="highlights",
            target_len=128,
            metrics=("rouge",),
        ),
        data=DataConfig(dataset="cnn_dailymail", tokenizer="bpe", batch_size=32, seq_len=1024),
        train=TrainConfig(
            steps=20_000,
            log_every=100,
            checkpoint_every=2000,
            eval_every=2000,
            eval_steps=20,
            sample_prompt="",
        ),
        # The fairseq BART summarization recipe: Adam at 3e-5 with 500 warmup steps.
        optimizer=OptimizerConfig(
            learning_rate=3e-5, warmup_steps=500, b2=0.999, eps=1e-8, weight_decay=0.01
        ),
        generate=GenerateConfig(
            beam_size=4,
            length_penalty=2.0,
            length_penalty_form="hf",
            early_stopping="true",
            eval_examples=1000,
        ),
    )
    if arg in (None, "base"):
        return cfg
    if not arg:
        raise ConfigError("give the model: finetune/cnn_dailymail_bart:DIR (or :tiny, :base)")
    directory = (
        tiny_seq2seq_checkpoint("bart", "BartForConditionalGeneration", TINY) if tiny else arg
    )
    return seq2seq_from_checkpoint(cfg, directory, tiny=tiny, seq_len=96)
