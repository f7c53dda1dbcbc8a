"""lmflax.models: BERT-style encoders, GPT-style decoders, encoder-decoders and word2vec,
built from lmflax.nn.

Each family is a config (a `ModelConfig` subclass registered by its `family` name) and modules.
`PRESETS` names the classic sizes and tiny ones for tests. `heads` puts classification, tagging
and extractive-QA heads on them for fine-tuning.
"""

from lmflax.config import ConfigError, register_model_names, suggest
from lmflax.models import bert, gpt, seq2seq, word2vec
from lmflax.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertOutput,
    RobertaConfig,
    RobertaModel,
    encoder,
)
from lmflax.models.config import POSITIONS, ModelConfig, register_model_config
from lmflax.models.gpt import GPT, GPTConfig
from lmflax.models.heads import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    ClassificationHead,
    GPTForSequenceClassification,
    RobertaClassificationHead,
    RobertaForSequenceClassification,
    SpanHead,
)
from lmflax.models.seq2seq import EncoderDecoder, Seq2SeqConfig
from lmflax.models.word2vec import Word2Vec, Word2VecConfig

PRESETS = {**gpt.PRESETS, **bert.PRESETS, **seq2seq.PRESETS, **word2vec.PRESETS}


def preset(name: str) -> ModelConfig:
    """The model config of a preset name ('gpt2_small', 'bert_tiny', ...); ConfigError naming
    the presets otherwise. `--config.model=NAME` uses it."""
    if name not in PRESETS:
        raise ConfigError(
            f"not a model preset{suggest(name, PRESETS)}; accepted: {', '.join(sorted(PRESETS))}"
            ", or hf:DIR (a Hugging Face model directory)"
        )
    return PRESETS[name]


register_model_names("", preset)

__all__ = [
    "GPT",
    "POSITIONS",
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
    "ModelConfig",
    "RobertaClassificationHead",
    "RobertaConfig",
    "RobertaForSequenceClassification",
    "RobertaModel",
    "Seq2SeqConfig",
    "SpanHead",
    "Word2Vec",
    "Word2VecConfig",
    "encoder",
    "preset",
    "register_model_config",
]
