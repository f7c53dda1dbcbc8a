"""lmflax: Transformer language models in JAX/Flax."""

from typing import Any

__version__ = "0.1.0"

# Hugging Face interop at the top level, imported on first use so `import lmflax` stays light.
_HF = ("from_pretrained", "save_pretrained", "load_tokenizer")


def __getattr__(name: str) -> Any:
    if name in _HF:
        from lmflax import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'lmflax' has no attribute {name!r}")


__all__ = ["from_pretrained", "load_tokenizer", "save_pretrained"]
