"""Extractive QA: SQuAD v1.1 fine-tuning a pretrained BERT (or RoBERTa / DistilBERT) with a span
head, BERT's recipe: 384-token windows 128 tokens apart, peak rate 3e-5 with warm-up, 2 epochs.

  --config=finetune/squad_bert:DIR   DIR a Hugging Face BERT-family directory (bert-base-uncased:
                                     its BertForPreTraining checkpoint; the span head starts
                                     fresh); model and tokenizer both come from DIR
  --config=finetune/squad_bert:tiny  the same pipeline on bert_tiny with a trained wordpiece
  --config=finetune/squad_bert       bert-base's shapes, from scratch (for planning)
"""

import dataclasses

from lmflax.config import override
from lmflax.configs import squad
from lmflax.configs.finetune import model_and_tokenizer


def get_config(arg: str | None = None):
    cfg = squad.get_config()
    tiny = arg == "tiny"
    model, tokenizer = model_and_tokenizer(arg, "bert_tiny", "bert_base")
    return override(
        cfg,
        {
            "model": model,
            "data": dataclasses.replace(
                cfg.data,
                tokenizer=tokenizer,
                seq_len=256 if tiny else 384,
                batch_size=32,
            ),
            "train": dataclasses.replace(
                cfg.train,
                steps=200 if tiny else 5500,  # 2 epochs of SQuAD's 88k questions at batch 32
                eval_every=0 if tiny else 2750,
            ),
            "optimizer": dataclasses.replace(
                cfg.optimizer,
                learning_rate=5e-4 if tiny else 3e-5,
                warmup_steps=20 if tiny else 550,
                weight_decay=0.01,
            ),
        },
    )
