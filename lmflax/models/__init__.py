"""lmflax.models: BERT-style encoders and GPT-style decoders built from lmflax.nn.

Each family is a config (a `ModelConfig` subclass registered by its `family` name) and modules.
`PRESETS` names the classic sizes and tiny ones for tests.
"""

from lmflax.models import bert, gpt
from lmflax.models.bert import BertConfig, BertForMaskedLM, BertModel, BertOutput
from lmflax.models.gpt import GPT, GPTConfig

PRESETS = {**gpt.PRESETS, **bert.PRESETS}

__all__ = [
    "GPT",
    "PRESETS",
    "BertConfig",
    "BertForMaskedLM",
    "BertModel",
    "BertOutput",
    "GPTConfig",
]
