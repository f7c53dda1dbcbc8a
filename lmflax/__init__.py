"""lmflax: Transformer language models in JAX/Flax.

Layers, each importing only the ones below it (tests/test_layers_import.py keeps it so):

    cli      lmflax train | eval | generate | plan | viz | vectors | config
    train    Trainer, the loop, checkpoints, evaluation, Run.open, the planner
    tasks    a model family + its batches + loss + metrics
    core     losses, train state, train_step / eval_step, the optimizer
    hf       Hugging Face checkpoints in and out
    data     sources, grain pipelines, tokenizers
    models   GPT / BERT / encoder-decoders / word2vec, their configs; decode, evaluate, vectors
    nn       layers; parallel (meshes, rules)
    config   the schema
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Hugging Face interop at the top level, loaded on first use so `import lmflax` stays light
# (importing lmflax.hf brings in jax, flax and the models).
_HF = ("from_pretrained", "save_pretrained", "load_tokenizer")


def __getattr__(name: str) -> Any:
    if name in _HF:
        return getattr(importlib.import_module("lmflax.hf"), name)
    raise AttributeError(f"module 'lmflax' has no attribute {name!r}")


__all__ = ["from_pretrained", "load_tokenizer", "save_pretrained"]
