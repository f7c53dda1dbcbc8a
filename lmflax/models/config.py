"""The model section of a config: `ModelConfig` (a stack plus vocabulary and positions), which
every family extends, and the registry that makes families loadable by name.

    @register_model_config
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyConfig(ModelConfig):
        family = "mine"
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from lmflax.config import ModelSection, one_of, register_model_family
from lmflax.nn import StackConfig

POSITIONS = ("learned", "sinusoidal", "rope", "none")
LORA_BASE_DTYPES = ("param", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA: low-rank adapters on the Dense kernels whose parameter path matches `targets`; only
    the adapters are trained (see lmflax.models.lora and docs/lora.md).

    rank: the adapters' rank r (0 = off: the whole model is trained). alpha: the update is
    (alpha / rank) · A·B. dropout: the probability of dropping each input feature of the adapter
    path in training (one mask per step and matrix). targets: regular expressions searched in
    each kernel's parameter path ('decoder/layers_0/attention/query'; 'layers' when scanned).
    base_dtype: how the frozen weights are stored: 'param' (model.param_dtype), 'bfloat16', or
    'int8' (Dense kernels int8 with per-output-channel float32 scales, the rest bfloat16).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention/(query|value)",)
    base_dtype: str = "param"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of the low-rank update."""
        return self.alpha / self.rank

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = []
        if self.rank < 0:
            errs.append(f"model.lora.rank must be >= 0 (0 = off), got {self.rank}")
        if not self.rank:
            if self != LoraConfig():
                errs.append(
                    "model.lora settings are set but model.lora.rank is 0 (LoRA off); "
                    "set model.lora.rank > 0"
                )
            return errs
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < float("inf")):
            errs.append(f"model.lora.alpha must be a finite number > 0, got {self.alpha}")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            errs.append(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            errs.append("model.lora.targets is empty; give regexes such as 'attention/query'")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                errs.append(f"model.lora.targets: {pattern!r} is not a regular expression: {e}")
        one_of(errs, "model.lora.base_dtype", self.base_dtype, LORA_BASE_DTYPES)
        return errs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(StackConfig, ModelSection):
    """A model: a stack plus its vocabulary and positions. Families subclass it.

    position: 'learned' (a [max_len, D] table), 'sinusoidal' (the fixed table), 'rope' (rotary,
    in attention, on the first rope_fraction of each head's dimensions), or 'none'.
    lora: low-rank adapters (`LoraConfig`; model.lora.rank > 0 turns them on).
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
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def validate(self) -> list[str]:
        """Returns the problems of this model config as messages (empty = valid)."""
        errs = StackConfig.validate(self, "model.")
        errs += self.lora.validate()
        for name in ("vocab_size", "max_len"):
            if getattr(self, name) <= 0:
                errs.append(f"model.{name} must be > 0, got {getattr(self, name)}")
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
        if self.position != "rope" and self.rope_scaling != "none":
            errs.append(
                f"model.rope_scaling={self.rope_scaling!r} is only used with "
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
