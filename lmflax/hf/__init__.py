"""Hugging Face interop: load and export checkpoints and tokenizers of local model directories.

    model, params = lmflax.hf.from_pretrained(DIR)        # BERT/RoBERTa/DistilBERT/GPT-2, no torch
    tokenizer = lmflax.hf.load_tokenizer(DIR)             # tokenizer.json or vocab.txt (+ config),
                                                          # Marian's source/target .spm + vocab.json
    batch = tokenizer(["a sentence", "another one"])      # input_ids / token_type_ids / attention_mask
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      batch["token_type_ids"], deterministic=True)
    lmflax.hf.save_pretrained(model_config, params, OUT, tokenizer=tokenizer)   # transformers loads it
    model, params = lmflax.hf.from_pretrained(DIR, mesh=mesh)  # each tensor read into its shards

Supported architectures: BertModel, BertForMaskedLM, BertForPreTraining (its MLM head),
BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering;
RobertaModel / XLMRobertaModel and their ForMaskedLM, ForSequenceClassification,
ForTokenClassification, ForQuestionAnswering heads (lmflax.hf.roberta: RobertaConfig);
DistilBertModel, DistilBertForMaskedLM, DistilBertForTokenClassification,
DistilBertForQuestionAnswering (lmflax.hf.distilbert: a BertConfig with type_vocab_size=0);
GPT2Model, GPT2LMHeadModel, and the Llama-family decoders LlamaForCausalLM, MistralForCausalLM
and Qwen2ForCausalLM (lmflax.hf.llama), and the encoder-decoder T5ForConditionalGeneration,
v1.0 and v1.1 (lmflax.hf.t5), BartForConditionalGeneration and MarianMTModel (lmflax.hf.bart).
`model.init_from='hf:DIR'` in a
training config starts from a checkpoint (see `init_params`); `seq2seq_settings(DIR)` gives an
encoder-decoder's decoder start, forced / banned tokens and beam settings as config overrides.
"""

from lmflax.config import register_model_names
from lmflax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from lmflax.data.hub import CheckpointError
from lmflax.hf import (
    bart,  # noqa: F401  (registers BartForConditionalGeneration, MarianMTModel)
    distilbert,  # noqa: F401  (registers DistilBertModel and its heads)
    llama,  # noqa: F401  (registers LlamaForCausalLM, Mistral, Qwen2)
    roberta,  # noqa: F401  (registers RobertaModel, XLMRobertaModel and their heads)
    t5,  # noqa: F401  (registers T5ForConditionalGeneration)
)
from lmflax.hf.convert import ARCHITECTURES
from lmflax.hf.pretrained import (
    HF_SCHEME,
    check_init_from,
    from_pretrained,
    init_params,
    model_config,
    save_pretrained,
    seq2seq_settings,
)
from lmflax.models import BertForSequenceClassification

# `--config.model=hf:DIR` takes the architecture from DIR/config.json.
register_model_names(HF_SCHEME, lambda value: model_config(value[len(HF_SCHEME) :]))

__all__ = [
    "ARCHITECTURES",
    "BertForSequenceClassification",
    "CheckpointError",
    "HFTokenizer",
    "check_init_from",
    "from_pretrained",
    "init_params",
    "load_tokenizer",
    "model_config",
    "save_pretrained",
    "seq2seq_settings",
]
