"""Sentiment: SST-2 (glue/sst2, 2 classes) fine-tuning a pretrained RoBERTa with its own
classification head (dense + tanh + out_proj on <s>).

  --config=finetune/sst2_roberta:DIR   DIR a Hugging Face RoBERTa or XLM-RoBERTa directory
                                         (roberta-base: its RobertaForMaskedLM checkpoint);
                                         model and tokenizer both come from DIR
  --config=finetune/sst2_roberta:tiny  a tiny random RoBERTa (wordpiece trained on the data)
  --config=finetune/sst2_roberta       roberta-base's shapes, from scratch (for planning)
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
            "task": TaskConfig(name="classification", num_labels=2),
            "data": dataclasses.replace(
                cfg.data,
                dataset="glue/sst2",
                eval_split="validation",
                tokenizer=tokenizer,
                seq_len=64,
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
            # RoBERTa's fine-tuning recipe: a small peak rate with warmup.
            "optimizer": dataclasses.replace(
                cfg.optimizer, learning_rate=5e-4 if tiny else 2e-5, warmup_steps=100
            ),
        },
    )
