"""The model section of a config: `ModelConfig` (a stack plus vocabulary and positions), which
every family extends, and the registry that makes families loadable by name.

    @register_model_config
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyConfig(ModelConfig):
        family = "mine"
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lmflax.config import ModelSection, one_of, register_model_family
from lmflax.nn import StackConfig

POSITIONS = ("learned", "sinusoidal", "rope", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(StackConfig, ModelSection):
    """A model: a stack plus its vocabulary and positions. Families subclass it.

    position: 'learned' (a [max_len, D] table), 'sinusoidal' (the fixed table), 'rope' (rotary,
    in attention, on the first rope_fraction of each head's dimensions), or 'none'.
    init_from: 'hf:DIR' starts training from the weights of a Hugging Face model directory
    (lmflax.hf); the architecture settings must match its config.json (`model=hf:DIR` takes
    them from it). That is checked by `lmflax.train.resolve`, which reads the directory.
    """

    family: ClassVar[str] = ""
    vocab_size: int = 4096
    max_len: int = 512
    position: str = "learned"
    tie_embeddings: bool = True
    init_from: str | None = None

    def validate(self) -> list[str]:
        """Returns the problems of this model config as messages (empty = valid)."""
        errs = StackConfig.validate(self, "model.")
        if self.vocab_size < 2:
            errs.append(
                f"model.vocab_size must be >= 2 (a model predicts one of its tokens), got "
                f"{self.vocab_size}"
            )
        if self.max_len <= 0:
            errs.append(f"model.max_len must be > 0, got {self.max_len}")
        one_of(errs, "model.position", self.position, POSITIONS)
        if self.position == "rope" and self.rope_base is None:
            errs.append("model.position='rope' needs model.rope_base > 0 (e.g. 10000.0)")
        if self.position != "rope" and self.rope_base is not None:
            errs.append(
                f"model.rope_base={self.rope_base} is only used with model.position='rope', "
                f"but position is {self.position!r}"
            )
        if self.position != "rope" and self.rope_fraction != 1.0:
            errs.append(
                f"model.rope_fraction={self.rope_fraction} is only used with "
                f"model.position='rope', but position is {self.position!r}"
            )
        return errs

    def check_inputs(self, seq_len: int) -> list[str]:
        """Rows longer than a position table cannot be embedded."""
        if self.position in ("learned", "sinusoidal") and seq_len > self.max_len:
            return [
                f"data.seq_len ({seq_len}) is longer than the model's {self.position} "
                f"positions (model.max_len={self.max_len})"
            ]
        return []


def register_model_config(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: makes a ModelConfig subclass loadable by its `family` name."""
    register_model_family(cls)
    return cls
