"""The grain input pipeline: TFDS source -> shuffle -> this process's share -> tokenize -> pack
into fixed-length rows -> objective (causal targets or MLM masking) -> batch.

Every stage is deterministic given the seed, and the iterator's `get_state()`/`set_state()`
resume at exactly the next batch (the trainer checkpoints that state with the model).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from lmflax.config import Config, DataConfig
from lmflax.data import files, objectives, sources
from lmflax.data.hf_tokenizer import load_tokenizer
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import KINDS, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def texts(source: Any, key: str, limit: int) -> Iterator[str]:
    for i in range(min(limit, len(source))):
        yield text_of(source[i], key, i)


def text_of(record: dict[str, Any], key: str, index: int) -> str:
    if key not in record:
        raise DataError(
            f"record {index} has no text feature {key!r}; its features are {sorted(record)} "
            "(set data.text_key)"
        )
    value = record[key]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"record {index}, feature {key!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    return str(value)


def tokenizer_for(data: DataConfig, vocab_size: int, default_kind: str = "bpe") -> Tokenizer:
    """The tokenizer the data config names, trained and cached on first use when it is a kind.

    data.tokenizer: 'bpe' / 'wordpiece' (trained on the first tokenizer_train_docs records of the
    training split with vocab_size entries, cached under data_dir/lmflax_tokenizers), a
    tokenizer.json path, or 'hf:DIR' (DIR/tokenizer.json).
    """
    spec = data.tokenizer or default_kind
    if spec in KINDS:
        data_dir = data.data_dir or sources.default_data_dir()
        dataset = files.cache_name(data.dataset, data.data_dir)
        name = re.sub(r"[^\w.-]", "_", f"{dataset}-{data.train_split}")
        path = (
            Path(data_dir)
            / "lmflax_tokenizers"
            / f"{name}-{spec}-{vocab_size}-{data.tokenizer_train_docs}.json"
        )

        def write(tmp: Path) -> None:
            source = sources.data_source(
                data.dataset, data.train_split, data_dir, download=data.download
            )
            log.info("training a %s tokenizer (vocab %d) -> %s", spec, vocab_size, path)
            sample = texts(source, data.text_key, data.tokenizer_train_docs)
            train_tokenizer(spec, sample, vocab_size).save(tmp)

        tokenizer = Tokenizer.from_file(sources.build_once(path, write))
    elif spec.startswith("hf:"):
        # Not the bare tokenizer.json: HF directories often save padding/truncation in it
        # (all-MiniLM-L6-v2 pads every text to 128), and some have only vocab.txt.
        tokenizer = load_tokenizer(spec[3:]).to_lmflax()
    else:
        tokenizer = Tokenizer.from_file(spec)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}; ids would fall outside the embedding table"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Iterator state


def state_from_json(state: Any) -> Any:
    """A grain iterator state read back from JSON, with lists turned back into tuples.

    grain 0.2.18's concat-then-split packer compares its "no remainder" sentinel as the tuple
    (-1, -1); after a JSON round trip it is a list, the comparison fails and the restored
    iterator resumes at the wrong row. Every list in these states was a tuple.
    """
    if isinstance(state, dict):
        return {k: state_from_json(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(state_from_json(v) for v in state)
    return state


# ---------------------------------------------------------------------------------------------
# Datasets


def derive_seed(seed: int, *salt: str) -> int:
    """A 32-bit seed for one purpose ('documents', split, ...) derived from the run's seed, so
    that every stream of randomness is independent and reproducible."""
    digest = hashlib.sha256(("/".join([str(seed), *salt])).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def documents(
    data: DataConfig,
    split: str,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> grain.MapDataset:
    """Records of `split`, shuffled anew each epoch, repeated forever, this process's share."""
    source = sources.data_source(data.dataset, split, data.data_dir, download=data.download)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=derive_seed(seed, "documents", split))
    ds = ds.repeat(None)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def read_options(data: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, data.prefetch_threads), prefetch_buffer_size=64)


def _tokenize(
    data: DataConfig, encode: Callable[[list[int]], dict[str, np.ndarray]], tokenizer: Tokenizer
) -> Callable[[int, dict[str, Any]], dict[str, np.ndarray]]:
    def fn(index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return encode(tokenizer.encode(text_of(record, data.text_key, index)))

    return fn


def _window_shuffle(
    ds: grain.IterDataset, data: DataConfig, seed: int, split: str
) -> grain.IterDataset:
    # Packed rows of one document are adjacent; mix rows across a window of documents.
    if data.shuffle_buffer > 1:
        ds = gx.WindowShuffleIterDataset(
            ds, window_size=data.shuffle_buffer, seed=derive_seed(seed, "rows", split)
        )
    return ds


def causal_lm_dataset(
    cfg: Config,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches for next-token prediction, each a dict of [batch_size, seq_len] arrays:
    inputs, targets (int32), positions and segment_ids (int32; packed documents, 0 = padding),
    weights (float32; 1 where a target is real).
    """
    if tokenizer.eos_id is None:
        raise DataError("causal LM data needs a tokenizer with an end-of-text token")
    data, L = cfg.data, cfg.data.seq_len
    ds = documents(data, split, seed=seed, process_index=process_index, process_count=process_count)
    ds = ds.map_with_index(
        _tokenize(data, lambda ids: objectives.causal_document(ids, tokenizer.eos_id), tokenizer)
    )
    it = ds.to_iter_dataset(read_options(data))
    it = gx.ConcatThenSplitIterDataset(it, length_struct={"inputs": L, "targets": L})
    it = _window_shuffle(it, data, seed, split)

    def finish(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = ex["inputs_segment_ids"].astype(np.int32)
        return {
            "inputs": ex["inputs"].astype(np.int32),
            "targets": ex["targets"].astype(np.int32),
            "positions": ex["inputs_positions"].astype(np.int32),
            "segment_ids": seg,
            "weights": (seg > 0).astype(np.float32),
        }

    return it.map(finish).batch(batch_size, drop_remainder=True)


def mlm_dataset(
    cfg: Config,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches for masked language modelling, [batch_size, seq_len] each: inputs (corrupted),
    targets (original), weights (1 at the chosen positions), attention_mask (1 = real token).

    Rows are [CLS] + a run of documents each ended by [SEP], packed to seq_len.
    """
    missing = [n for n in ("cls_id", "sep_id", "mask_id") if getattr(tokenizer, n) is None]
    if missing:
        raise DataError(
            f"MLM data needs a tokenizer with [CLS], [SEP] and [MASK]; missing {missing}"
        )
    data, task, L = cfg.data, cfg.task, cfg.data.seq_len
    ds = documents(data, split, seed=seed, process_index=process_index, process_count=process_count)
    sep = np.array([tokenizer.sep_id], dtype=np.int32)
    ds = ds.map_with_index(
        _tokenize(
            data,
            lambda ids: {"tokens": np.concatenate([np.asarray(ids, np.int32), sep])},
            tokenizer,
        )
    )
    it = ds.to_iter_dataset(read_options(data))
    it = gx.ConcatThenSplitIterDataset(it, length_struct={"tokens": L - 1})
    it = _window_shuffle(it, data, seed, split)
    special = tokenizer.special_ids

    def finish(ex: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        real = ex["tokens_segment_ids"] > 0
        tokens = np.where(real, ex["tokens"], tokenizer.pad_id).astype(np.int32)
        tokens = np.concatenate([[tokenizer.cls_id], tokens]).astype(np.int32)
        out = objectives.mask_tokens(
            tokens,
            rng,
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            special_ids=special,
            probability=task.mlm_probability,
            mask_prob=task.mask_prob,
            random_prob=task.random_prob,
        )
        out["attention_mask"] = np.concatenate([[True], real]).astype(np.int32)
        return out

    it = it.random_map(finish, seed=derive_seed(seed, "mlm", split))
    return it.batch(batch_size, drop_remainder=True)
