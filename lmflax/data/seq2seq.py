"""Text pairs for encoder-decoders (translation, summarization) from TFDS through grain.

A record's `task.source_key` text becomes the encoder input, its `task.target_key` text the
target. One byte-level BPE vocabulary is trained on both sides (a joint vocabulary lets source and
target share the model's single embedding table). Pairs are padded, not packed: every row is
one example, with masks marking the padding on both sides.

  inputs [S] = source tokens (at most S - 1) + EOS, padded        inputs_mask [S]: 1 = real
  decoder_inputs [T] = START + targets[:-1], padded               targets [T] = target + EOS
  weights [T]: 1 where a target token is real

as Hugging Face fine-tunes its encoder-decoders: a sequence is framed with the tokenizer's own
special tokens when it has them (BART: <s> text </s> on both sides; T5, Marian: text </s>;
`Tokenizer.encode_sequence`), the target side of a Marian tokenizer uses its target.spm, and
START is task.decoder_start_id (transformers' `decoder_start_token_id`: BART's </s>, T5's and
Marian's pad; -1 = the EOS, lmflax's own convention), so decoder_inputs are transformers'
`shift_tokens_right(labels)` and weights 0 are its labels of -100.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from lmflax.config import Config
from lmflax.data import files, sources
from lmflax.data.pipeline import documents, read_options, text_of, tokenizer_for
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import KINDS, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# TFDS builders that this TFDS release does not import by itself (they live in modules that
# `import tensorflow_datasets` skips); importing the module registers the builder, which
# `tfds.data_source` and `tfds.testing.mock_data` need.
_TFDS_MODULES = {
    "wmt13_translate": "tensorflow_datasets.translate.wmt13",
    "wmt14_translate": "tensorflow_datasets.translate.wmt14",
    "wmt15_translate": "tensorflow_datasets.translate.wmt15",
    "wmt16_translate": "tensorflow_datasets.translate.wmt16",
    "wmt17_translate": "tensorflow_datasets.translate.wmt17",
    "wmt18_translate": "tensorflow_datasets.translate.wmt18",
    "wmt19_translate": "tensorflow_datasets.translate.wmt19",
    "wmt_t2t_translate": "tensorflow_datasets.translate.wmt_t2t",
    "cnn_dailymail": "tensorflow_datasets.summarization.cnn_dailymail",
}


def register_tfds_builder(dataset: str) -> None:
    """Imports the TFDS module defining `dataset` ('wmt14_translate/de-en', ...) if it is one
    that TFDS does not import by itself."""
    module = _TFDS_MODULES.get(dataset.split("/")[0].split(":")[0])
    if module is not None:
        importlib.import_module(module)


def pair_of(
    record: dict[str, Any], source_key: str, target_key: str, index: int
) -> tuple[str, str]:
    """(source text, target text) of one record."""
    for key, field in ((source_key, "task.source_key"), (target_key, "task.target_key")):
        if key not in record:
            raise DataError(
                f"record {index} has no feature {key!r} ({field}); its features are "
                f"{sorted(record)}"
            )
    return text_of(record, source_key, index), text_of(record, target_key, index)


def _pair_texts(source: Any, source_key: str, target_key: str, limit: int) -> Iterator[str]:
    for i in range(min(limit, len(source))):
        src, tgt = pair_of(source[i], source_key, target_key, i)
        yield src
        yield tgt


def load_pair_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer `data.tokenizer` names: 'bpe' / 'wordpiece' train one vocabulary of
    model.vocab_size entries on both sides of the first data.tokenizer_train_docs training pairs
    (cached under data_dir/lmflax_tokenizers); a path or 'hf:DIR' loads one."""
    data, task, vocab_size = cfg.data, cfg.task, cfg.model.vocab_size
    if data.tokenizer not in KINDS:
        tokenizer = tokenizer_for(data, vocab_size)
    else:
        data_dir = data.data_dir or sources.default_data_dir()
        name = re.sub(
            r"[^\w.+-]",
            "_",
            f"{files.cache_name(data.dataset, data.data_dir)}-{data.train_split}-"
            f"{task.source_key}+{task.target_key}",
        )
        path = (
            Path(data_dir)
            / "lmflax_tokenizers"
            / f"{name}-{data.tokenizer}-{vocab_size}-{data.tokenizer_train_docs}.json"
        )

        def write(tmp: Path) -> None:
            source = sources.data_source(
                data.dataset, data.train_split, data.data_dir, download=data.download
            )
            log.info(
                "training a joint %s tokenizer (vocab %d) -> %s", data.tokenizer, vocab_size, path
            )
            texts = _pair_texts(source, task.source_key, task.target_key, data.tokenizer_train_docs)
            train_tokenizer(data.tokenizer, texts, vocab_size).save(tmp)

        tokenizer = Tokenizer.from_file(sources.build_once(path, write))
        if tokenizer.vocab_size > vocab_size:
            raise DataError(
                f"tokenizer {path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{vocab_size}"
            )
    if end_id(tokenizer) is None:
        raise DataError(
            f"seq2seq needs a tokenizer with an end-of-sequence token (<|endoftext|>, </s>, "
            f"<eos> or [SEP]); {data.tokenizer!r} has none"
        )
    return tokenizer


def end_id(tokenizer: Tokenizer) -> int | None:
    """The token that ends a sequence (EOS, or [SEP] for WordPiece)."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id


def start_id(tokenizer: Tokenizer, decoder_start_id: int = -1) -> int:
    """The decoder's first input: task.decoder_start_id, or the end token when it is -1."""
    if decoder_start_id >= 0:
        return decoder_start_id
    end = end_id(tokenizer)
    if end is None:
        raise DataError("the tokenizer has no end token (EOS or [SEP]) to start the decoder with")
    return end


def encode_source(tokenizer: Tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """text -> (ids [length], mask [length]): the framed sequence (`encode_sequence`, at most
    `length` tokens), right-padded."""
    ids = tokenizer.encode_sequence(text, length)
    out = np.full(length, tokenizer.pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros(length, np.int32)
    mask[: len(ids)] = 1
    return out, mask


def encode_pair(
    tokenizer: Tokenizer,
    source: str,
    target: str,
    source_len: int,
    target_len: int,
    decoder_start_id: int = -1,
) -> dict[str, np.ndarray]:
    """One training example (see the module docstring for the fields)."""
    inputs, inputs_mask = encode_source(tokenizer, source, source_len)
    tgt = tokenizer.encode_sequence(target, target_len, target=True)
    n = len(tgt)
    targets = np.full(target_len, tokenizer.pad_id, np.int32)
    targets[:n] = tgt
    decoder_inputs = np.full(target_len, tokenizer.pad_id, np.int32)
    decoder_inputs[0] = start_id(tokenizer, decoder_start_id)
    # All of targets shifted right, the final EOS too when it fits (a padded position, which
    # transformers' shift_tokens_right also fills with it).
    decoder_inputs[1 : n + 1] = tgt[: target_len - 1]
    weights = np.zeros(target_len, np.float32)
    weights[:n] = 1.0
    return {
        "inputs": inputs,
        "inputs_mask": inputs_mask,
        "decoder_inputs": decoder_inputs,
        "targets": targets,
        "weights": weights,
    }


def seq2seq_dataset(
    cfg: Config,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of padded pairs, each a dict of [batch_size, L] arrays (L = data.seq_len for the
    encoder fields, task.target_len for the decoder ones); shuffled, repeating, resumable."""
    data, task = cfg.data, cfg.task

    def encode(index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
        src, tgt = pair_of(record, task.source_key, task.target_key, index)
        return encode_pair(
            tokenizer, src, tgt, data.seq_len, task.target_len, task.decoder_start_id
        )

    ds = documents(
        data,
        split,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        featurize=encode,
    )
    it = ds.to_iter_dataset(read_options(data))
    return it.batch(batch_size, drop_remainder=True)


def eval_pairs(cfg: Config, split: str, count: int) -> list[tuple[str, str]]:
    """The first `count` (source, target) text pairs of `split`, in the dataset's order."""
    data, task = cfg.data, cfg.task
    source = sources.data_source(data.dataset, split, data.data_dir, download=data.download)
    return [
        pair_of(source[i], task.source_key, task.target_key, i)
        for i in range(min(count, len(source)))
    ]
