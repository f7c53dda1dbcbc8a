"""Romanian -> English translation on WMT'16 (TFDS wmt16_translate/ro-en) fine-tuning a
pretrained MarianMTModel (Helsinki-NLP opus-mt), scored by BLEU (sacrebleu) of beam-search
translations of the validation set after training.

  --config=finetune/wmt16_ro_en_marian:DIR   DIR a Marian directory or hub id, e.g.
        Helsinki-NLP/opus-mt-ro-en: the model, its tokenizer (source.spm / target.spm /
        vocab.json, through sentencepiece) and its conventions come from DIR: the decoder
        starts from the pad token, which is never generated (bad_words_ids), a translation cut
        at max_length ends with </s> (forced_eos_token_id), and its beam settings
  --config=finetune/wmt16_ro_en_marian:tiny  a random tiny MarianMTModel exported to the temp
        dir with the same conventions in the ids of lmflax's BPE tokenizer (trained on both
        sides of the data), so that the whole path runs offline on a laptop CPU
  --config=finetune/wmt16_ro_en_marian       opus-mt's shapes (6 + 6 layers, d_model 512,
        58,101 tokens), from scratch (for planning)

The data must be prepared once: lmflax data prepare wmt16_translate/ro-en
"""

from lmflax.config import (
    Config,
    DataConfig,
    GenerateConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.configs.finetune import seq2seq_from_checkpoint, tiny_seq2seq_checkpoint
from lmflax.hf import bart

# opus-mt's MarianConfig (Helsinki-NLP/opus-mt-en-de's vocabulary; each pair has its own).
OPUS_MT = dict(
    vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
    decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
    scale_embedding=True, dropout=0.1, attention_dropout=0.0,
)  # fmt: skip
# lmflax's BPE tokenizer: <|endoftext|> = 0 ends sequences, <|pad|> = 1 pads. Marian's
# conventions in those ids: start from the pad, never generate it, end at the limit with EOS.
TINY = dict(
    OPUS_MT, vocab_size=2048, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0,
    pad_token_id=1, eos_token_id=0, decoder_start_token_id=1, forced_eos_token_id=0,
    bad_words_ids=[[1]], num_beams=2, max_length=33,
)  # fmt: skip


def get_config(arg: str | None = None) -> Config:
    tiny = arg == "tiny"
    cfg = Config(
        model=bart.to_config(bart.ARCHS["marian"], OPUS_MT, (), "opus-mt"),
        task=TaskConfig(
            name="seq2seq", source_key="ro", target_key="en", target_len=128, metrics=("bleu",)
        ),
        data=DataConfig(
            dataset="wmt16_translate/ro-en", tokenizer="bpe", batch_size=32, seq_len=128
        ),
        train=TrainConfig(
            steps=10_000,
            log_every=100,
            checkpoint_every=2000,
            eval_every=2000,
            eval_steps=20,
            sample_prompt="Casa este minunată.",
        ),
        # transformers' run_translation recipe: AdamW at 5e-5 (here with a short warmup).
        optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=500, weight_decay=0.0),
        generate=GenerateConfig(
            beam_size=4, length_penalty=1.0, length_penalty_form="hf", eval_examples=1999
        ),
    )
    if not arg:
        return cfg
    directory = tiny_seq2seq_checkpoint("marian", "MarianMTModel", TINY) if tiny else arg
    return seq2seq_from_checkpoint(cfg, directory, tiny=tiny, seq_len=64)
