"""lmflax.models: BERT-style encoders, GPT-style decoders, encoder-decoders and word2vec,
built from lmflax.nn.

Each family is a config (a `ModelConfig` subclass registered by its `family` name) and modules.
`PRESETS` names the classic sizes and tiny ones for tests. `heads` puts classification, tagging
and extractive-QA heads on them for fine-tuning.
"""

from lmflax.models import bert, gpt, seq2seq, word2vec
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
from lmflax.models.seq2seq import EncoderDecoder, Seq2SeqConfig
from lmflax.models.word2vec import Word2Vec, Word2VecConfig

PRESETS = {**gpt.PRESETS, **bert.PRESETS, **seq2seq.PRESETS, **word2vec.PRESETS}

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
    "EncoderDecoder",
    "GPTConfig",
    "GPTForSequenceClassification",
    "Seq2SeqConfig",
    "SpanHead",
    "Word2Vec",
    "Word2VecConfig",
]
