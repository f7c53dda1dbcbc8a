"""Named entities: CoNLL-2003 (9 BIO tags) fine-tuning a pretrained RoBERTa token classifier
(tags on each word's first sub-token, entities scored on 'dev').

  --config=finetune/conll2003_roberta:DIR   DIR a Hugging Face RoBERTa / XLM-RoBERTa
                                              directory; model and tokenizer come from it
  --config=finetune/conll2003_roberta:tiny  a tiny random RoBERTa (wordpiece on the data)
  --config=finetune/conll2003_roberta       roberta-base's shapes, from scratch
"""

import dataclasses

from lmflax.config import TaskConfig, override
from lmflax.configs import bert_tiny
from lmflax.configs.finetune import model_and_tokenizer


def get_config(arg: str | None = None):
    cfg = bert_tiny.get_config()
    tiny = arg == "tiny"
    # lmflax's wordpiece tokenizer pads with id 0 (RoBERTa's own tokenizer with 1).
    model, tokenizer = model_and_tokenizer(arg, "roberta_tiny", "roberta_base", pad_token_id=0)
    return override(
        cfg,
        {
            "model": model,
            "task": TaskConfig(name="tagging", num_labels=9),
            "data": dataclasses.replace(
                cfg.data,
                dataset="conll2003",
                eval_split="dev",
                tokenizer=tokenizer,
                seq_len=128,
                batch_size=32,
            ),
            "train": dataclasses.replace(
                cfg.train,
                steps=200 if tiny else 2000,
                log_every=50,
                checkpoint_every=500,
                eval_every=500,
                eval_steps=1000,
                sample_tokens=0,
            ),
            "optimizer": dataclasses.replace(
                cfg.optimizer, learning_rate=5e-4 if tiny else 3e-5, warmup_steps=100
            ),
        },
    )
