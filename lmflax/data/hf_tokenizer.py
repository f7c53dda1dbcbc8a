"""The tokenizer of a Hugging Face model directory, through the `tokenizers` library.

`HFTokenizer.from_pretrained(dir)` reads `tokenizer.json`, or builds the same tokenizer that
`transformers` builds from `vocab.txt` (BERT WordPiece) or `vocab.json` + `merges.txt` (GPT-2
byte-level BPE), with the settings of `tokenizer_config.json`. Calling it on a batch of texts
gives the `input_ids` / `token_type_ids` / `attention_mask` arrays a BERT expects.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from lmflax.data.chat import TEMPLATE_FILE, read_chat_template
from lmflax.data.hub import CheckpointError, model_dir
from lmflax.data.marian_tokenizer import MarianTokenizer, is_marian_dir
from lmflax.data.tokenizers import Tokenizer

SPECIAL_KEYS = (
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
    "bos_token",
    "eos_token",
)
# transformers' sentinel for "no limit" (int(1e30)); anything this large means unset.
_NO_LIMIT = 10**29
_BERT_DEFAULTS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
_GPT2_DEFAULTS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _wordpiece(
    vocab_file: Path, cfg: dict[str, Any], specials: dict[str, str]
) -> tokenizers.Tokenizer:
    """BERT's tokenizer from vocab.txt, built as transformers builds it (BertConverter)."""
    vocab = models.WordPiece.read_file(str(vocab_file))
    unk = specials.get("unk_token", "[UNK]")
    backend = tokenizers.Tokenizer(
        models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100)
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        strip_accents=cfg.get("strip_accents"),
        lowercase=bool(cfg.get("do_lower_case", True)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = specials.get("cls_token", "[CLS]"), specials.get("sep_token", "[SEP]")
    for token in (cls, sep):
        if token not in vocab:
            raise CheckpointError(f"{vocab_file} has no {token!r}, which BERT inputs need")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([t for t in dict.fromkeys(specials.values()) if t in vocab])
    return backend


def _byte_level_bpe(
    vocab_file: Path, merges_file: Path, cfg: dict[str, Any], specials: dict[str, str]
) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt (as transformers' GPT2Converter)."""
    vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(cfg.get("add_prefix_space", False))
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([t for t in dict.fromkeys(specials.values()) if t in vocab])
    return backend


@dataclasses.dataclass
class HFTokenizer:
    """A `tokenizers.Tokenizer` with a model directory's special tokens and limits.

    backend: the tokenizer, with padding and truncation off (they are set per call).
    special_tokens: {"pad_token": "[PAD]", "cls_token": "[CLS]", ...} as the directory names them.
    model_max_length: the longest input the model takes (None = no limit known).
    model_input_names: which arrays __call__ returns.
    config: the directory's tokenizer_config.json, written back by `save`.
    chat_template: the directory's Jinja chat template, if it has one (lmflax.data.chat).
    """

    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]
    model_max_length: int | None = None
    model_input_names: tuple[str, ...] = ("input_ids", "token_type_ids", "attention_mask")
    padding_side: str = "right"
    truncation_side: str = "right"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None

    def __post_init__(self) -> None:
        # Padding and truncation live on the backend; a lock keeps concurrent calls apart.
        self._lock = threading.Lock()
        self.backend.no_padding()
        self.backend.no_truncation()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, revision: str | None = None, subfolder: str | None = None
    ) -> HFTokenizer:
        """Loads the tokenizer of a HF model directory (tokenizer.json, or vocab.txt, or
        vocab.json + merges.txt, with tokenizer_config.json / special_tokens_map.json), or of
        a hub id found in the Hugging Face cache (see `lmflax.data.hub.model_dir`)."""
        directory = model_dir(path, revision=revision, subfolder=subfolder)
        cfg = _read_optional_json(directory / "tokenizer_config.json")
        special_map = _read_optional_json(directory / "special_tokens_map.json")
        model_type = _read_optional_json(directory / "config.json").get("model_type")
        tokenizer_class = str(cfg.get("tokenizer_class") or "")
        gpt2_like = model_type == "gpt2" or tokenizer_class.startswith("GPT2")
        specials: dict[str, str] = {}
        for key in SPECIAL_KEYS:
            token = _token_text(cfg.get(key)) or _token_text(special_map.get(key))
            if token is not None:
                specials[key] = token
        if (directory / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:
                raise CheckpointError(
                    f"{directory / 'tokenizer.json'} cannot be read: {e}"
                ) from None
        elif (directory / "vocab.txt").is_file():
            specials = {**_BERT_DEFAULTS, **specials}
            backend = _wordpiece(directory / "vocab.txt", cfg, specials)
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            specials = {**_GPT2_DEFAULTS, **specials}
            backend = _byte_level_bpe(
                directory / "vocab.json", directory / "merges.txt", cfg, specials
            )
        else:
            raise FileNotFoundError(
                f"no tokenizer in {directory}: looked for tokenizer.json, vocab.txt (BERT "
                "WordPiece), vocab.json + merges.txt (GPT-2 byte-level BPE) and source.spm + "
                "vocab.json (Marian, through load_tokenizer)"
            )
        if not specials:
            # A bare tokenizer.json: take the usual names it knows.
            defaults = _GPT2_DEFAULTS if gpt2_like else _BERT_DEFAULTS
            specials = {k: v for k, v in defaults.items() if backend.token_to_id(v) is not None}
        missing = [f"{k}={v!r}" for k, v in specials.items() if backend.token_to_id(v) is None]
        if missing:
            raise CheckpointError(
                f"{directory}: special tokens not in the vocabulary: {', '.join(missing)}"
            )
        limit = cfg.get("model_max_length")
        if not isinstance(limit, int) or limit >= _NO_LIMIT:
            limit = None
        names = cfg.get("model_input_names")
        if not names:
            names = (
                ("input_ids", "attention_mask")
                if gpt2_like or model_type in _DECODER_MODEL_TYPES
                else ("input_ids", "token_type_ids", "attention_mask")
            )
        return cls(
            backend=backend,
            special_tokens=specials,
            model_max_length=limit,
            model_input_names=tuple(names),
            padding_side=cfg.get("padding_side", "right"),
            truncation_side=cfg.get("truncation_side", "right"),
            config=dict(cfg),
            chat_template=read_chat_template(directory, cfg),
        )

    # -- special tokens -------------------------------------------------------------------

    def token_id(self, key: str) -> int | None:
        """The id of special token `key` ('pad_token', 'cls_token', ...), None if unset."""
        if key not in SPECIAL_KEYS:
            raise KeyError(f"unknown special token {key!r}; accepted: {', '.join(SPECIAL_KEYS)}")
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def cls_token_id(self) -> int | None:
        return self.token_id("cls_token")

    @property
    def sep_token_id(self) -> int | None:
        return self.token_id("sep_token")

    @property
    def mask_token_id(self) -> int | None:
        return self.token_id("mask_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encoding -------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        truncation: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "np",
    ) -> dict[str, Any]:
        """Texts (and optional second segments) -> {input_ids, token_type_ids, attention_mask}.

        text: a string or a batch of strings; each result is then [B, T] (B = 1 for a string).
        padding: True / 'longest' (to the longest in the batch), 'max_length' (to max_length),
        False (none; the texts must then have equal lengths unless return_tensors=None).
        truncation: True / 'longest_first', 'only_first', 'only_second', or False; the limit is
        max_length, else the model's model_max_length. Unlike transformers' default, padding and
        truncation are on, because the results are arrays.
        return_tensors: 'np' (int32 NumPy arrays), 'jax' (jax arrays) or None (lists).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(
                    f"text_pair has {len(pairs)} entries but text has {len(texts)}; give one "
                    "second segment per text"
                )
            inputs: list[Any] = list(zip(texts, pairs))
        else:
            inputs = texts
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}; accepted: True, 'longest', 'max_length', False")
        strategies = ("longest_first", "only_first", "only_second")
        if truncation not in (True, False, "do_not_truncate", *strategies):
            raise ValueError(
                f"truncation={truncation!r}; accepted: True, {', '.join(map(repr, strategies))}, False"
            )
        if return_tensors not in ("np", "jax", None):
            raise ValueError(f"return_tensors={return_tensors!r}; accepted: 'np', 'jax', None")
        limit = max_length if max_length is not None else self.model_max_length
        with self._lock:
            try:
                if truncation not in (False, "do_not_truncate") and limit is not None:
                    strategy = "longest_first" if truncation is True else truncation
                    self.backend.enable_truncation(
                        limit, strategy=strategy, direction=self.truncation_side
                    )
                if padding not in (False, "do_not_pad"):
                    pad_id = self.pad_token_id
                    if pad_id is None:
                        raise ValueError(
                            "this tokenizer has no pad token, so it cannot pad; set one, e.g. "
                            "tokenizer.special_tokens['pad_token'] = '<|endoftext|>', or pass "
                            "padding=False"
                        )
                    if padding == "max_length" and limit is None:
                        raise ValueError("padding='max_length' needs max_length (no model limit)")
                    self.backend.enable_padding(
                        direction=self.padding_side,
                        pad_id=pad_id,
                        pad_type_id=0,
                        pad_token=self.special_tokens["pad_token"],
                        length=limit if padding == "max_length" else None,
                        pad_to_multiple_of=pad_to_multiple_of,
                    )
                encodings = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            finally:
                self.backend.no_padding()
                self.backend.no_truncation()
        columns = {
            "input_ids": [e.ids for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        out = {k: columns[k] for k in self.model_input_names if k in columns}
        if return_tensors is None:
            return out
        lengths = {len(row) for row in out["input_ids"]}
        if len(lengths) > 1:
            raise ValueError(
                f"the encoded texts have different lengths {sorted(lengths)} and padding is off; "
                "pass padding=True or return_tensors=None"
            )
        arrays = {k: np.asarray(v, dtype=np.int32).reshape(len(inputs), -1) for k, v in out.items()}
        if return_tensors == "jax":
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        return arrays

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """One text -> its ids (no padding or truncation)."""
        with self._lock:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # -- conversion and saving ------------------------------------------------------------

    def to_lmflax(self) -> Tokenizer:
        """The same vocabulary as an lmflax data-pipeline `Tokenizer` (an independent copy), with
        the special tokens this directory names taking the place of the ones found by their
        usual spellings (Llama 3's eos is '<|end_of_text|>', not '</s>'), and its chat template."""
        found = Tokenizer.from_backend(tokenizers.Tokenizer.from_str(self.backend.to_str()))
        ids = {field: self.token_id(f"{field[:-3]}_token") for field in _LMFLAX_IDS}
        named = {field: i for field, i in ids.items() if i is not None}
        return dataclasses.replace(
            found,
            **named,
            chat_template=self.chat_template,
            special_tokens=tuple(sorted(self.special_tokens.items())),
        )

    def save(self, path: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `path`
        (a directory), which transformers' AutoTokenizer loads."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.pop("added_tokens_decoder", None)  # tokenizer.json holds the added tokens
        cfg.update(self.special_tokens)
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        cfg["padding_side"] = self.padding_side
        cfg["truncation_side"] = self.truncation_side
        cfg["model_input_names"] = list(self.model_input_names)
        if not cfg.get("tokenizer_class"):
            gpt2_like = "token_type_ids" not in self.model_input_names
            cfg["tokenizer_class"] = "GPT2Tokenizer" if gpt2_like else "BertTokenizer"
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if self.chat_template is not None and "chat_template" not in cfg:
            (out / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        (out / "special_tokens_map.json").write_text(
            json.dumps(self.special_tokens, indent=2) + "\n"
        )


# The lmflax Tokenizer fields taken from the directory's special tokens ('eos_id' <- eos_token).
_LMFLAX_IDS = ("eos_id", "pad_id", "bos_id", "unk_id", "cls_id", "sep_id", "mask_id")

# Decoder-only model types whose tokenizers (like GPT-2's) have no token type ids.
_DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_tokenizer(
    path: str | Path, *, revision: str | None = None, subfolder: str | None = None
) -> HFTokenizer | MarianTokenizer:
    """The tokenizer of a HF model directory or hub id: a Marian directory (source.spm,
    target.spm, vocab.json and no tokenizer.json) as a `MarianTokenizer` (sentencepiece), any
    other as an `HFTokenizer` (see `HFTokenizer.from_pretrained`)."""
    directory = model_dir(path, revision=revision, subfolder=subfolder)
    if is_marian_dir(directory):
        return MarianTokenizer.from_pretrained(directory)
    return HFTokenizer.from_pretrained(directory)
