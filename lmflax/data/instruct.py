"""Instruction tuning data: (prompt, response) records as causal-LM rows with the prompt masked.

A record's `task.source_key` text is the prompt (the user's turn) and its `task.target_key`
text the response. Each is formatted (lmflax.data.chat: the tokenizer's chat template, or the
plain format) into a prompt part and a completion, tokenized separately and concatenated; only
the completion's tokens are trained on. One example per row, right-padded, not packed:

  ids = prompt part + completion (+ EOS for the plain format), cut to seq_len + 1 tokens
  inputs [T] = ids[:-1]       targets [T] = ids[1:]       positions [T] = 0, 1, ...
  weights [T]: 1 where the target is a completion token   segment_ids [T]: 1 = real, 0 = pad

A row whose prompt alone fills seq_len has no completion token left, hence weight 0 everywhere
(it adds nothing to the loss); raise data.seq_len if prompts are that long.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lmflax.config import Config, ConfigError
from lmflax.config.schema import CHAT_TEMPLATES
from lmflax.data import chat
from lmflax.data.pipeline import documents, read_options
from lmflax.data.seq2seq import pair_of
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import Tokenizer

FORMATS = CHAT_TEMPLATES


def template_for(tokenizer: Tokenizer, fmt: str) -> str | None:
    """The chat template that `task.chat_template` = fmt selects (None = the plain format)."""
    if fmt not in FORMATS:
        raise ConfigError(f"task.chat_template must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "plain":
        return None
    if fmt == "tokenizer" and tokenizer.chat_template is None:
        raise ConfigError(
            "task.chat_template='tokenizer' but the tokenizer (data.tokenizer) has no chat "
            "template (chat_template.jinja, or chat_template in tokenizer_config.json); use "
            "'auto' or 'plain'"
        )
    return tokenizer.chat_template


def _start_id(tokenizer: Tokenizer) -> int:
    # The plain format starts like a document: BOS, or GPT-2's <|endoftext|> where there is none.
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise DataError("instruction tuning needs a tokenizer with a BOS or an EOS token")
    return start


def _head_ids(tokenizer: Tokenizer, head: str, template: str | None) -> list[int]:
    # A template writes its own BOS (`{{ bos_token }}`); the plain format starts with one.
    start = [] if template is not None else [_start_id(tokenizer)]
    return start + tokenizer.encode(head)


def prompt_ids(
    tokenizer: Tokenizer, prompt: str, template: str | None, system: str = ""
) -> list[int]:
    """The ids a model reads before it answers `prompt` (what generation starts from)."""
    head, _, _ = chat.prompt_and_completion(
        template, prompt, "", special_tokens=dict(tokenizer.special_tokens), system=system
    )
    return _head_ids(tokenizer, head, template)


def encode_example(
    tokenizer: Tokenizer,
    prompt: str,
    response: str,
    seq_len: int,
    template: str | None,
    system: str = "",
) -> dict[str, np.ndarray]:
    """One row (see the module docstring for the fields), each [seq_len]."""
    head, completion, add_eos = chat.prompt_and_completion(
        template, prompt, response, special_tokens=dict(tokenizer.special_tokens), system=system
    )
    p = _head_ids(tokenizer, head, template)
    c = tokenizer.encode(completion)
    if add_eos:
        if tokenizer.eos_id is None:
            raise DataError("the plain instruction format needs a tokenizer with an EOS token")
        c.append(tokenizer.eos_id)
    ids = (p + c)[: seq_len + 1]
    trained = ([0] * len(p) + [1] * len(c))[: seq_len + 1]
    n = len(ids) - 1
    out = {
        "inputs": np.full(seq_len, tokenizer.pad_id, np.int32),
        "targets": np.full(seq_len, tokenizer.pad_id, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
    }
    out["inputs"][:n] = ids[:-1]
    out["targets"][:n] = ids[1:]
    out["positions"][:n] = np.arange(n)
    out["segment_ids"][:n] = 1
    out["weights"][:n] = trained[1:]
    return out


def instruct_dataset(
    cfg: Config,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of [batch_size, data.seq_len] rows; shuffled, repeating, resumable."""
    data, task = cfg.data, cfg.task
    template = template_for(tokenizer, task.chat_template)

    def encode(index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
        prompt, response = pair_of(record, task.source_key, task.target_key, index)
        try:
            return encode_example(
                tokenizer, prompt, response, data.seq_len, template, task.system_prompt
            )
        except chat.ChatTemplateError as e:
            raise DataError(f"record {index} of split {split!r}: {e}") from None

    ds = documents(
        data,
        split,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        featurize=encode,
    )
    return ds.to_iter_dataset(read_options(data)).batch(batch_size, drop_remainder=True)
