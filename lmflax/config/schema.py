"""The experiment schema: a tree of frozen, typed dataclasses with `Config` at the root.

Every section validates itself (`validate() -> list[str]`, empty = valid); `Config.validate`
adds the checks that relate two sections. Nothing here imports the rest of lmflax: the model
section's classes come from `lmflax.models`, which registers them here by `family` (and the
names a `model=NAME` value may take) when it is imported. Checks that need other layers (known
task names, metric names, a Hugging Face directory on disk) happen once, in
`lmflax.train.resolve`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, ClassVar

from lmflax.config.errors import (
    ConfigError,
    finite_floats,
    finite_tree,
    one_of,
    suggest,
    type_problems,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Base of every model config. `lmflax.models.ModelConfig` is the one families extend; this
    layer only needs to know that a model section has a `family` and validates itself."""

    family: ClassVar[str] = ""

    def validate(self) -> list[str]:
        """The problems of this model config as messages (empty = valid)."""
        return []

    def check_inputs(self, seq_len: int) -> list[str]:
        """Problems with feeding this model rows of `seq_len` tokens (empty = none)."""
        del seq_len
        return []


CHAT_TEMPLATES = ("auto", "tokenizer", "plain")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What the model is trained to do.

    name: 'causal_lm' (next-token prediction, GPT) or 'mlm' (BERT masked language modelling:
    mlm_probability of the tokens are chosen; of those mask_prob become [MASK], random_prob a
    random token, the rest stay), or 'seq2seq' (an encoder-decoder maps a record's source_key
    text, data.seq_len tokens at most, to its target_key text, target_len tokens at most; the
    generated text is scored with `metrics`, 'bleu' and/or 'rouge', at the end).
    decoder_start_id: the token the decoder starts from (decoder inputs are it + the targets
    shifted right; generation starts from it); -1 = the tokenizer's end-of-sequence token,
    lmflax's own convention. Pretrained checkpoints name theirs (`decoder_start_token_id`: T5
    and Marian the pad token, BART its EOS).

    loss_chunk_size: 0 computes the full [B, T, V] logits; N > 0 computes the loss N positions
    (of every row) at a time with `chunked_cross_entropy`, which never holds the full float32
    logits and needs no recomputation in the backward pass (less memory, same values).
    mlm_max_predictions: 0 applies the MLM output layer at every position; K > 0 gathers the (at
    most) K chosen positions of each row first, as BERT's max_predictions_per_seq does (chosen
    positions beyond K are left out of the loss and counted in the 'mlm_dropped' metric).
    Fine-tuning (lmflax.tasks.classification / tagging / qa): num_labels is the head's output
    size and must equal the dataset's classes (or BIO tags); pooling is 'pooled' or 'first'
    ([CLS]) or 'mean' for BERT, 'last' (last real token) or 'mean' for GPT, 'auto' = pooled /
    last. QA: questions are cut to max_query_len tokens, contexts split into windows starting
    doc_stride tokens apart, answers at most max_answer_len tokens long.
    Instruction tuning ('instruct', lmflax.tasks.instruct: a decoder trained on a record's
    source_key prompt -> target_key response, the loss on the response only): chat_template
    'auto' formats examples with the tokenizer's chat template when it has one and the plain
    '### Instruction: / ### Response:' format otherwise; 'tokenizer' requires the template,
    'plain' never uses it. system_prompt, when set, is the conversation's first (system) turn.
    """

    name: str = "causal_lm"
    mlm_probability: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    loss_chunk_size: int = 0
    mlm_max_predictions: int = 0
    num_labels: int = 2
    pooling: str = "auto"
    max_query_len: int = 64
    doc_stride: int = 128
    max_answer_len: int = 30
    source_key: str = "inputs"
    target_key: str = "targets"
    target_len: int = 128
    metrics: tuple[str, ...] = ("bleu",)
    chat_template: str = "auto"
    system_prompt: str = ""
    decoder_start_id: int = -1

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid). Whether `name` is a known
        task and `metrics` known metrics is judged by `lmflax.train.resolve`."""
        errs: list[str] = []
        finite_floats(errs, "task", self)
        if not 0.0 < self.mlm_probability < 1.0:
            errs.append(f"task.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            errs.append(
                "task.mask_prob + task.random_prob must be within [0, 1], got "
                f"{self.mask_prob} + {self.random_prob}"
            )
        for name in ("loss_chunk_size", "mlm_max_predictions"):
            if getattr(self, name) < 0:
                errs.append(f"task.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.mlm_max_predictions and self.name != "mlm":
            errs.append(
                f"task.mlm_max_predictions is for task 'mlm', but task.name is {self.name!r}"
            )
        if self.chat_template not in CHAT_TEMPLATES:
            errs.append(
                f"task.chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got "
                f"{self.chat_template!r}"
            )
        for name in ("target_len", "num_labels", "max_query_len", "doc_stride", "max_answer_len"):
            if getattr(self, name) <= 0:
                errs.append(f"task.{name} must be > 0, got {getattr(self, name)}")
        if self.decoder_start_id < -1:
            errs.append(
                f"task.decoder_start_id must be a token id >= 0, or -1 (the tokenizer's EOS), "
                f"got {self.decoder_start_id}"
            )
        return errs


# generate.early_stopping -> lmflax.decode.beam_search's early_stopping.
EARLY_STOPPING = {"exact": None, "true": True, "false": False, "never": "never"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """How text is generated (`train.py --generate`, and seq2seq's evaluation after training).

    beam_size > 1: beam search with length_penalty alpha, in length_penalty_form 'gnmt'
    (((5 + n) / 6)^alpha) or 'hf' (n^alpha, transformers'); early_stopping 'exact' stops when no
    live beam can win, 'true' / 'false' / 'never' are transformers' early_stopping rules (with
    'hf', beam search then gives transformers' generate tokens). beam_size 1: sampling with
    temperature (0 = greedy), top_k (0 = off) and top_p (1.0 = off). max_new_tokens: 0 = the
    task's default (task.target_len for seq2seq, train.sample_tokens for a causal LM).
    eval_examples: examples of data.eval_split decoded and scored after training (0 = none);
    their predictions are written to workdir/predictions.jsonl.
    forced_bos_id / forced_eos_id: the token the first / last (max_new_tokens-th) new token must
    be, -1 = none; banned_ids: tokens never generated (transformers' forced_bos_token_id,
    forced_eos_token_id and single-token bad_words_ids: BART forces <s> then </s>, Marian bans
    its pad token). min_new_tokens: no EOS before this many new tokens; no_repeat_ngram_size n:
    no n-gram generated twice (with the prompt / decoder start counted), 0 = off
    (transformers' min_new_tokens, or an encoder-decoder's min_length - 1, and
    no_repeat_ngram_size: bart-large-cnn sets min_length 56 and no_repeat_ngram_size 3).
    repetition_penalty p > 0: tokens already in the sequence (prompt included, its left pads
    not) have positive scores divided by p and negative ones multiplied by p, 1.0 = off
    (transformers' repetition_penalty). encoder_repetition_penalty p > 0: the tokens of the
    source (encoder inputs, or a decoder's prompt) have positive scores multiplied by p and
    negative ones divided by p, 1.0 = off (transformers' encoder_repetition_penalty).
    """

    beam_size: int = 1
    length_penalty: float = 0.6
    length_penalty_form: str = "gnmt"
    early_stopping: str = "exact"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 0
    eval_examples: int = 64
    seed: int = 0
    forced_bos_id: int = -1
    forced_eos_id: int = -1
    banned_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = []
        finite_floats(errs, "generate", self)
        if self.beam_size < 1:
            errs.append(f"generate.beam_size must be >= 1, got {self.beam_size}")
        one_of(errs, "generate.length_penalty_form", self.length_penalty_form, ("gnmt", "hf"))
        one_of(errs, "generate.early_stopping", self.early_stopping, tuple(EARLY_STOPPING))
        if self.temperature < 0:
            errs.append(f"generate.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            errs.append(f"generate.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            errs.append(f"generate.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        for name in ("max_new_tokens", "eval_examples", "min_new_tokens", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                errs.append(f"generate.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if not getattr(self, name) > 0:
                errs.append(f"generate.{name} must be > 0 (1.0 = off), got {getattr(self, name)}")
        for name in ("forced_bos_id", "forced_eos_id"):
            if getattr(self, name) < -1:
                errs.append(
                    f"generate.{name} must be a token id >= 0, or -1 (none), got "
                    f"{getattr(self, name)}"
                )
        bad = [t for t in self.banned_ids if not isinstance(t, int) or t < 0]
        if bad:
            errs.append(f"generate.banned_ids must be token ids >= 0, got {bad}")
        return errs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where batches come from.

    dataset: a TFDS name ('lmflax_pystdlib', the embedded corpus built on first use from the
    Python standard library; or any TFDS text dataset prepared in array_record format, e.g.
    'lm1b', 'c4/en', 'wikipedia/20230601.en'). tokenizer: 'bpe' (byte-level BPE) or 'wordpiece'
    trained on the training split and cached under data_dir, or a path to a tokenizer.json, or
    'hf:DIR' for a Hugging Face model directory. batch_size is global (all processes).
    num_shards: the global batch is read as this many data shards (0 = one per process when a
    run starts; a resumed run keeps its checkpoint's count). The data depends on it, never on the
    process count or mesh; see lmflax.data.shards.

    Your own files (lmflax.data.files; converted once to ArrayRecord, cached by content hash):
    dataset 'text:DIR_OR_GLOB' (text_per: 'file' = one document per file, 'line' = per line),
    'jsonl:PATH', 'csv:PATH', 'tsv:PATH' or 'parquet:PATH' (a file, a directory or a glob),
    'hf-disk:DIR' (a Hugging Face `datasets` save_to_disk folder; a DatasetDict's own splits), or
    'KIND:train=PATH,validation=PATH' with a file per split. Without a validation file,
    validation_fraction of the records (chosen by a hash of their content) become the
    'validation' split. Columns: text_key (the text; a fine-tuning task's words or context),
    label_key (a class name or id; a list of tags for tagging), others by `fields`
    ('feature=column,...', e.g. 'question=query,answers=gold'). label_names: the label set in
    id order (empty = an hf-disk ClassLabel's names, else the training rows' distinct labels,
    sorted).
    """

    dataset: str = "lmflax_pystdlib"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_key: str = "text"
    tokenizer: str = "bpe"
    tokenizer_train_docs: int = 20000
    batch_size: int = 16
    seq_len: int = 128
    shuffle_buffer: int = 1024
    prefetch_threads: int = 1
    download: bool = False
    num_shards: int = 0
    text_per: str = "file"
    label_key: str = "label"
    label_names: tuple[str, ...] = ()
    fields: str = ""
    validation_fraction: float = 0.05

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = file_dataset_errors(self)
        if self.batch_size <= 0:
            errs.append(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.seq_len <= 0:
            errs.append(f"data.seq_len must be > 0, got {self.seq_len}")
        if self.tokenizer_train_docs < 0:
            errs.append(
                f"data.tokenizer_train_docs must be >= 0 (word2vec: 0 = all), got "
                f"{self.tokenizer_train_docs}"
            )
        if self.shuffle_buffer < 0:
            errs.append(
                f"data.shuffle_buffer must be >= 0 (0 or 1 = off), got {self.shuffle_buffer}"
            )
        for name in ("dataset", "train_split", "text_key"):
            if not getattr(self, name):
                errs.append(f"data.{name} must not be empty")
        if self.num_shards < 0:
            errs.append(
                f"data.num_shards must be >= 0 (0 = one per process), got {self.num_shards}"
            )
        elif self.num_shards and self.batch_size > 0 and self.batch_size % self.num_shards:
            errs.append(
                f"data.batch_size ({self.batch_size}) must be divisible by data.num_shards "
                f"({self.num_shards})"
            )
        return errs


# File datasets (`data.dataset='KIND:...'`, read by lmflax.data.files): the kinds, and the
# prefixes a user might try that name no kind.
FILE_KINDS = ("text", "jsonl", "csv", "tsv", "parquet", "hf-disk")
_NOT_FILE_KINDS = {
    "json": "jsonl (one JSON object per line)",
    "ndjson": "jsonl",
    "jsonlines": "jsonl",
    "txt": "text",
    "file": "text, jsonl, csv, tsv, parquet or hf-disk",
}


def file_dataset_splits(dataset: str) -> dict[str, str] | None:
    """For 'KIND:SPEC', the split -> path pattern it names ('' = one set of files to carve the
    validation split from); None when `dataset` is not a file dataset. ConfigError if SPEC is
    malformed."""
    kind, sep, rest = dataset.partition(":")
    if not sep or kind not in FILE_KINDS:
        return None
    if not rest.strip():
        raise ConfigError(f"data.dataset={dataset!r} names no file after {kind + ':'!r}")
    if not re.match(r"^\w+=", rest):
        return {"": rest}
    splits: dict[str, str] = {}
    for part in rest.split(","):
        m = re.fullmatch(r"(\w+)=(.+)", part.strip())
        if not m:
            raise ConfigError(
                f"data.dataset={dataset!r}: {part!r} is not SPLIT=PATH (e.g. "
                f"'{kind}:train=a.{kind},validation=b.{kind}')"
            )
        if m.group(1) in splits:
            raise ConfigError(f"data.dataset={dataset!r} names split {m.group(1)!r} twice")
        splits[m.group(1)] = m.group(2)
    if "train" not in splits:
        raise ConfigError(
            f"data.dataset={dataset!r} names splits {sorted(splits)} but no 'train' split"
        )
    return splits


def field_map(fields: str) -> dict[str, str]:
    """data.fields 'feature=column,...' as {feature: column}; ConfigError if malformed."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in fields.split(","))):
        feature, sep, column = part.partition("=")
        if not sep or not feature.strip() or not column.strip():
            raise ConfigError(
                f"data.fields entry {part!r} is not FEATURE=COLUMN (e.g. 'question=query')"
            )
        out[feature.strip()] = column.strip()
    return out


def file_dataset_errors(data: DataConfig) -> list[str]:
    """Problems of the file-dataset settings of `data` (empty = none, or a TFDS name)."""
    errs: list[str] = []
    kind, sep, _ = data.dataset.partition(":")
    if sep and kind in _NOT_FILE_KINDS:
        errs.append(
            f"data.dataset={data.dataset!r}: {kind + ':'!r} is not a file kind; use "
            f"{_NOT_FILE_KINDS[kind]}; accepted: {', '.join(k + ':' for k in FILE_KINDS)}"
        )
    for check, value in ((file_dataset_splits, data.dataset), (field_map, data.fields)):
        try:
            check(value)
        except ConfigError as e:
            errs.append(str(e))
    one_of(errs, "data.text_per", data.text_per, ("file", "line"))
    if not 0.0 <= data.validation_fraction < 1.0:
        errs.append(f"data.validation_fraction must be in [0, 1), got {data.validation_fraction}")
    if len(set(data.label_names)) != len(data.label_names):
        errs.append(f"data.label_names has repeated names: {data.label_names}")
    return errs


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: how long, how often to log/evaluate/checkpoint, what to print at the end.

    checkpoint_every=0 saves only at the end; eval_every=0 evaluates only at the end.
    Retention: the newest keep_checkpoints checkpoints survive, plus every step that is a multiple
    of keep_every (0 = none). verify_checkpoints checks each checkpoint's recorded SHA-256 sums
    before restoring it. nonfinite: what a NaN/Inf loss, gradient or updated parameter does —
    'stop' (exit non-zero, naming the step) or 'skip' (the update is dropped, parameters and
    optimizer state stay bit-for-bit unchanged, and the skips are counted in the metrics);
    either way no update from a non-finite step is ever applied or saved.
    sample_tokens tokens are generated from sample_prompt at the end (0 = no sample).
    writers: where logged values go, comma-separated: 'jsonl' (workdir/metrics.jsonl, which
    `lmflax viz curves` and analysis read), 'tensorboard' (workdir/tensorboard), 'wandb'
    (Weights & Biases; pip install wandb), 'clu' (clu's default writer; pip install clu
    tensorflow), and 'python:MODULE:CALLABLE' for any other (a callable taking the workdir and returning an
    object with write_scalars, write_texts, flush, close: a clu MetricWriter, a W&B adapter).
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    keep_every: int = 0
    verify_checkpoints: bool = True
    nonfinite: str = "stop"
    eval_every: int = 0
    eval_steps: int = 10
    sample_prompt: str = "def "
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    progress: bool = True
    writers: str = "jsonl,tensorboard"

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = []
        finite_floats(errs, "train", self)
        if self.steps <= 0:
            errs.append(f"train.steps must be > 0, got {self.steps}")
        for name in ("log_every", "eval_steps"):
            if getattr(self, name) <= 0:
                errs.append(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every", "sample_tokens"):
            if getattr(self, name) < 0:
                errs.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints <= 0:
            errs.append(f"train.keep_checkpoints must be > 0, got {self.keep_checkpoints}")
        if self.keep_every < 0:
            errs.append(f"train.keep_every must be >= 0 (0 = off), got {self.keep_every}")
        one_of(errs, "train.nonfinite", self.nonfinite, ("stop", "skip"))
        if self.sample_temperature < 0:
            errs.append(f"train.sample_temperature must be >= 0, got {self.sample_temperature}")
        names = ("jsonl", "tensorboard", "wandb", "clu")
        for w in (x.strip() for x in self.writers.split(",")):
            if w and w not in names and not w.startswith("python:"):
                errs.append(
                    f"train.writers entry {w!r} is not a writer; accepted: {', '.join(names)}, "
                    f"python:MODULE:CALLABLE{suggest(w, names)}"
                )
        return errs


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warm-up then `schedule` ('cosine', 'linear' or 'constant') decay to
    min_lr_ratio · learning_rate at the last step; global-norm clipping at clip_norm (0 = off);
    weight decay on kernels and embeddings only (never norms or biases); gradient accumulation
    over grad_accum_steps micro-batches of batch_size / grad_accum_steps.
    name: 'adamw', or 'sgd' (plain SGD, word2vec's optimizer; b1, b2 and eps unused).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = []
        finite_floats(errs, "optimizer", self)
        if errs:
            return errs
        if self.learning_rate <= 0:
            errs.append(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            errs.append(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        one_of(errs, "optimizer.schedule", self.schedule, ("cosine", "linear", "constant"))
        one_of(errs, "optimizer.name", self.name, ("adamw", "sgd"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errs.append(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip_norm < 0 or self.eps <= 0:
            errs.append(
                "optimizer.weight_decay and clip_norm must be >= 0 and eps > 0, got "
                f"{self.weight_decay}, {self.clip_norm}, {self.eps}"
            )
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            errs.append(f"optimizer.b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.grad_accum_steps <= 0:
            errs.append(f"optimizer.grad_accum_steps must be > 0, got {self.grad_accum_steps}")
        return errs


DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations' batch axis goes over both data-parallel axes. Rules are applied in order and a
    # mesh axis is used once per array, so in an activation (batch, length, embed) `embed` finds
    # fsdp taken by batch and stays unsharded, while a parameter (vocab, embed) gets fsdp.
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("positions", None),
    ("token_types", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh axes (data, fsdp, tensor); one may be -1 = all remaining devices.

    rules map logical axis names (used by every parameter and activation) to mesh axes.
    memory_budget_gib: per-device memory (GiB) the compiled train step may use; a config that
    needs more is refused before anything is allocated (0 = unchecked). See lmflax.train.plan.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    memory_budget_gib: float = 0.0

    def validate(self) -> list[str]:
        """The problems of this section as messages (empty = valid)."""
        errs: list[str] = []
        finite_floats(errs, "mesh", self)
        sizes = self.sizes()
        for name, size in sizes.items():
            if size == 0 or size < -1:
                errs.append(f"mesh.{name} must be >= 1 or -1 (the rest), got {size}")
        if self.memory_budget_gib < 0:
            errs.append(
                f"mesh.memory_budget_gib must be >= 0 (0 = unchecked), got {self.memory_budget_gib}"
            )
        if sum(s == -1 for s in sizes.values()) > 1:
            errs.append(f"at most one mesh axis may be -1, got {sizes}")
        for rule in self.rules:
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                errs.append(f"mesh.rules entries are (logical_name, mesh_axes) pairs, got {rule!r}")
                continue
            axes = rule[1] if isinstance(rule[1], tuple) else (rule[1],)
            for ax in axes:
                if ax is not None and ax not in sizes:
                    errs.append(
                        f"mesh.rules maps {rule[0]!r} to unknown mesh axis {ax!r}; "
                        "accepted: data, fsdp, tensor"
                    )
        return errs

    def sizes(self) -> dict[str, int]:
        """{'data': ..., 'fsdp': ..., 'tensor': ...} as configured (-1 not yet filled in)."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment."""

    model: ModelSection
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)

    def validate(self) -> Config:
        """Raises ConfigError listing every impossible value; returns self when valid.

        Device-count checks are `lmflax.parallel.validate_devices`; checks needing other layers
        are `lmflax.train.resolve`.
        """
        # Values of the wrong type first: the range checks below would fail on them with a
        # TypeError ('<=' not supported between 'str' and 'int') instead of naming the key.
        errs = type_problems("", self)
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        # NaN passes every range check (`nan <= 0` is False); the sections check their own
        # floats, these two are checked here.
        errs = finite_tree("model", self.model) + finite_tree("data", self.data)
        if not errs:
            errs += self.model.validate()
        for section in (self.data, self.train, self.optimizer, self.mesh, self.task, self.generate):
            errs += section.validate()
        d, o, k = self.data, self.optimizer, self.task
        if not errs:
            errs += self.model.check_inputs(d.seq_len)
        if o.grad_accum_steps > 0 and d.batch_size % o.grad_accum_steps:
            errs.append(
                f"data.batch_size ({d.batch_size}) must be divisible by "
                f"optimizer.grad_accum_steps ({o.grad_accum_steps})"
            )
        if k.mlm_max_predictions > d.seq_len:
            errs.append(
                f"task.mlm_max_predictions ({k.mlm_max_predictions}) is more than data.seq_len "
                f"({d.seq_len}) positions"
            )
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        return self


def validate(cfg: Config) -> Config:
    """`cfg.validate()`: raises ConfigError listing every impossible value, else returns cfg."""
    return cfg.validate()


# ---------------------------------------------------------------------------------------------
# What the model layer registers here

MODEL_FAMILIES: dict[str, type[ModelSection]] = {}
_MODEL_NAMERS: list[tuple[str, Callable[[str], ModelSection]]] = []


def register_model_family(cls: type[ModelSection]) -> type[ModelSection]:
    """Makes a model config class loadable by its `family` name (from dicts and JSON)."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} needs a non-empty `family` class attribute")
    MODEL_FAMILIES[cls.family] = cls
    return cls


def register_model_names(prefix: str, lookup: Callable[[str], ModelSection]) -> None:
    """Lets `model=VALUE` name a model: `lookup(VALUE)` is used for values starting with
    `prefix` ('' = any value no other prefix claims, e.g. preset names). `lookup` raises
    ConfigError (or OSError/ValueError) saying what it accepts."""
    _MODEL_NAMERS[:] = [(p, f) for p, f in _MODEL_NAMERS if p != prefix] + [(prefix, lookup)]
    _MODEL_NAMERS.sort(key=lambda item: -len(item[0]))


def model_by_name(path: str, value: str) -> ModelSection:
    """The model config `model=value` names (a preset, or 'hf:DIR' once lmflax.hf is loaded)."""
    for prefix, lookup in _MODEL_NAMERS:
        if value.startswith(prefix):
            try:
                return lookup(value)
            except ConfigError as e:
                raise ConfigError(f"{path}={value!r}: {e}") from None
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}={value!r}: {e}") from None
    raise ConfigError(
        f"{path}={value!r}: no model names are known yet (import lmflax.models, which "
        "registers the presets)"
    )


def model_family(path: str, family: Any) -> type[ModelSection]:
    """The registered model config class for `family`, or ConfigError naming the known ones."""
    if family not in MODEL_FAMILIES:
        raise ConfigError(
            f"{path}.family is {family!r}{suggest(str(family), MODEL_FAMILIES)}; "
            f"accepted: {', '.join(sorted(MODEL_FAMILIES))}"
        )
    return MODEL_FAMILIES[family]


__all__ = [
    "DEFAULT_RULES",
    "FILE_KINDS",
    "MODEL_FAMILIES",
    "Config",
    "ConfigError",
    "DataConfig",
    "GenerateConfig",
    "MeshConfig",
    "ModelSection",
    "OptimizerConfig",
    "TaskConfig",
    "TrainConfig",
    "field_map",
    "file_dataset_splits",
    "model_by_name",
    "model_family",
    "one_of",
    "register_model_family",
    "register_model_names",
    "validate",
]
