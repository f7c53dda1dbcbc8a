"""Fine-tuning configs that start from a pretrained Hugging Face checkpoint."""

import dataclasses
from typing import Any

from lmflax.models import PRESETS


def model_and_tokenizer(arg: str | None, tiny: str, full: str, **changes: Any) -> tuple[Any, str]:
    """(model, data.tokenizer) for a config's argument: a checkpoint directory gives both
    ('hf:DIR'); 'tiny' (or no argument) the preset `tiny` (or `full`) with `changes`, and
    lmflax's wordpiece trained on the data."""
    if arg and arg != "tiny":
        return f"hf:{arg}", f"hf:{arg}"
    model = PRESETS[tiny if arg == "tiny" else full]
    return (dataclasses.replace(model, **changes) if changes else model), "wordpiece"
