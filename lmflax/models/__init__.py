"""lmflax.models: BERT-style encoders and GPT-style decoders built from lmflax.nn, and word2vec.

Each family is a config (a `ModelConfig` subclass registered by its `family` name) and modules.
`PRESETS` names the classic sizes and tiny ones for tests.
"""

from lmflax.models import bert, gpt, word2vec
from lmflax.models.bert import BertConfig, BertForMaskedLM, BertModel, BertOutput
from lmflax.models.gpt import GPT, GPTConfig
from lmflax.models.word2vec import Word2Vec, Word2VecConfig

PRESETS = {**gpt.PRESETS, **bert.PRESETS, **word2vec.PRESETS}

__all__ = [
    "GPT",
    "PRESETS",
    "BertConfig",
    "BertForMaskedLM",
    "BertModel",
    "BertOutput",
    "GPTConfig",
    "Word2Vec",
    "Word2VecConfig",
]
