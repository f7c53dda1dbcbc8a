"""lmflax.models: BERT-style encoders and GPT-style decoders built from lmflax.nn.

Each family is a config (a `ModelConfig` subclass registered by its `family` name) and modules.
`PRESETS` names the classic sizes and tiny ones for tests. `heads` puts classification, tagging
and extractive-QA heads on them for fine-tuning.
"""

from lmflax.models import bert, gpt
from lmflax.models.bert import BertConfig, BertForMaskedLM, BertModel, BertOutput
from lmflax.models.gpt import GPT, GPTConfig
from lmflax.models.heads import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    ClassificationHead,
    GPTForSequenceClassification,
    SpanHead,
)

PRESETS = {**gpt.PRESETS, **bert.PRESETS}

__all__ = [
    "GPT",
    "PRESETS",
    "BertConfig",
    "BertForMaskedLM",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertOutput",
    "ClassificationHead",
    "GPTConfig",
    "GPTForSequenceClassification",
    "SpanHead",
]
