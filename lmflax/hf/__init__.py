"""Hugging Face interop: load and export checkpoints and tokenizers of local model directories.

    model, params = lmflax.hf.from_pretrained(DIR)        # BERT family or GPT-2, no torch needed
    tokenizer = lmflax.hf.load_tokenizer(DIR)             # tokenizer.json or vocab.txt (+ config)
    batch = tokenizer(["a sentence", "another one"])      # input_ids / token_type_ids / attention_mask
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      batch["token_type_ids"], deterministic=True)
    lmflax.hf.save_pretrained(model_config, params, OUT, tokenizer=tokenizer)   # transformers loads it

Supported architectures: BertModel, BertForMaskedLM, BertForPreTraining (its MLM head),
BertForSequenceClassification, GPT2Model and GPT2LMHeadModel. `model.init_from='hf:DIR'` in a
training config starts from a checkpoint (see `init_params`).
"""

from lmflax.hf.classification import BertForSequenceClassification
from lmflax.hf.convert import ARCHITECTURES
from lmflax.hf.files import CheckpointError
from lmflax.hf.pretrained import (
    check_init_from,
    from_pretrained,
    init_params,
    model_config,
    save_pretrained,
)
from lmflax.hf.tokenizer import HFTokenizer, load_tokenizer

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
]
