"""The tokenizer of a Marian (Helsinki-NLP opus-mt) model directory, through `sentencepiece`.

These directories have no tokenizer.json: `source.spm` and `target.spm` are SentencePiece models
that cut source and target text into pieces, and `vocab.json` maps pieces to the model's ids
(one vocabulary for both sides). `MarianTokenizer` gives the ids `transformers.MarianTokenizer`
gives: a leading `>>lang<<` code kept as one token, pieces from the side's spm model, ids from
vocab.json (a piece it lacks is <unk>), `</s>` appended. `to_lmflax()` is the view the seq2seq
data pipeline reads through (source side for `encode`, target side for the targets and
`decode`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmflax.data.hub import CheckpointError, model_dir
from lmflax.data.sources import DataError

FILES = ("source.spm", "target.spm", "vocab.json")
_SPECIAL_KEYS = ("eos_token", "unk_token", "pad_token")
_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
SPIECE_UNDERLINE = "\u2581"


def is_marian_dir(directory: Path) -> bool:
    """Whether `directory` holds a Marian tokenizer (source.spm + vocab.json) and no
    tokenizer.json (which, when present, is read instead)."""
    return (
        (directory / "source.spm").is_file()
        and (directory / "vocab.json").is_file()
        and not (directory / "tokenizer.json").is_file()
    )


def _load_spm(path: Path) -> Any:
    try:
        import sentencepiece  # deferred: optional (the hf extra), only Marian folders need it
    except ImportError:
        raise ImportError(
            f"{path.parent} is a Marian tokenizer (source.spm, target.spm, vocab.json), which "
            "needs the sentencepiece package: pip install sentencepiece (or 'lmflax[hf]')"
        ) from None
    model = sentencepiece.SentencePieceProcessor()
    try:
        model.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable SentencePiece model: {e}") from None
    return model


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class MarianTokenizer:
    """source.spm / target.spm / vocab.json of a Marian model directory.

    special_tokens: {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"} (or what
    tokenizer_config.json names). model_max_length: the longest input (512 for opus-mt).
    """

    def __init__(
        self,
        directory: Path,
        source: Any,
        target: Any,
        vocab: dict[str, int],
        special_tokens: dict[str, str],
        model_max_length: int | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.directory = directory
        self.source, self.target = source, target
        self.vocab = vocab
        self.pieces = {i: p for p, i in vocab.items()}
        self.special_tokens = special_tokens
        self.model_max_length = model_max_length
        self.config = dict(config or {})
        self.unk_token_id = vocab[special_tokens["unk_token"]]

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, revision: str | None = None, subfolder: str | None = None
    ) -> MarianTokenizer:
        """Loads the tokenizer of a Marian model directory (or a cached hub id)."""
        directory = model_dir(path, revision=revision, subfolder=subfolder)
        missing = [f for f in FILES if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a complete Marian tokenizer: {', '.join(missing)} missing "
                f"(it needs {', '.join(FILES)})"
            )
        cfg_path = directory / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        if cfg.get("separate_vocabs"):
            raise CheckpointError(
                f"{directory}: separate_vocabs=True (a target_vocab.json of its own) is not "
                "supported; lmflax's encoder-decoders share one vocabulary"
            )
        vocab = _read_json(directory / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise CheckpointError(f"{directory / 'vocab.json'} is not a {{piece: id}} mapping")
        specials = {}
        for key in _SPECIAL_KEYS:
            value = cfg.get(key, _DEFAULTS[key])
            specials[key] = value["content"] if isinstance(value, dict) else str(value)
        absent = [f"{k}={v!r}" for k, v in specials.items() if v not in vocab]
        if absent:
            raise CheckpointError(
                f"{directory / 'vocab.json'} lacks special tokens: {', '.join(absent)}"
            )
        limit = cfg.get("model_max_length", 512)
        return cls(
            directory,
            _load_spm(directory / "source.spm"),
            _load_spm(directory / "target.spm"),
            vocab,
            specials,
            limit if isinstance(limit, int) and limit < 10**29 else None,
            cfg,
        )

    # -- special tokens -------------------------------------------------------------------

    def token_id(self, key: str) -> int | None:
        """The id of special token `key` ('pad_token', 'eos_token', 'unk_token'); None for the
        ones Marian lacks ('bos_token', 'cls_token', ...)."""
        token = self.special_tokens.get(key)
        return None if token is None else self.vocab[token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.special_tokens["pad_token"]]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.special_tokens["eos_token"]]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({self.vocab[t] for t in self.special_tokens.values()}))

    # -- encoding and decoding ------------------------------------------------------------

    def tokenize(self, text: str, *, target: bool = False) -> list[str]:
        """Text -> pieces: a leading '>>lang<<' code whole, the rest by source.spm (or
        target.spm)."""
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2 :]
        spm = self.target if target else self.source
        return code + list(spm.encode(text, out_type=str))

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        target: bool = False,
        max_length: int | None = None,
    ) -> list[int]:
        """Text -> ids (pieces a vocab.json lacks are <unk>), + </s> with add_special_tokens;
        max_length truncates the pieces so that the whole, </s> included, fits."""
        ids = [self.vocab.get(p, self.unk_token_id) for p in self.tokenize(text, target=target)]
        if max_length is not None:
            ids = ids[: max_length - (1 if add_special_tokens else 0)]
        return [*ids, self.eos_token_id] if add_special_tokens else ids

    def decode(
        self, ids: Sequence[int], *, skip_special_tokens: bool = True, target: bool = True
    ) -> str:
        """Ids -> text through target.spm (source.spm with target=False), as transformers
        decodes: runs of pieces detokenized by the spm model, special tokens kept verbatim
        (or dropped with skip_special_tokens; <unk> is one of them)."""
        spm = self.target if target else self.source
        specials = set(self.special_tokens.values())
        out, run = "", []
        for i in ids:
            piece = self.pieces.get(int(i))
            if piece is None:  # not in vocab.json: the spm model's own piece for that id
                piece = spm.IdToPiece(int(i)) or self.special_tokens["unk_token"]
            if piece in specials:
                if not skip_special_tokens:
                    out += spm.decode_pieces(run) + piece + " "
                    run = []
                continue
            run.append(piece)
        out += spm.decode_pieces(run)
        return out.replace(SPIECE_UNDERLINE, " ").strip()

    def batch_decode(self, batch: Sequence[Sequence[int]], **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]

    # -- conversion and saving ------------------------------------------------------------

    def to_lmflax(self) -> MarianPairTokenizer:
        """The view lmflax's seq2seq data pipeline reads through."""
        return MarianPairTokenizer(self)

    def save(self, path: str | Path) -> None:
        """Writes source.spm, target.spm, vocab.json and tokenizer_config.json to `path` (a
        directory), which transformers' MarianTokenizer loads."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (self.directory / name).resolve() != (out / name).resolve():
                shutil.copyfile(self.directory / name, out / name)
        cfg = {**self.config, **self.special_tokens, "tokenizer_class": "MarianTokenizer"}
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


@dataclasses.dataclass(frozen=True, eq=False)
class MarianPairTokenizer:
    """A MarianTokenizer with the interface of `lmflax.data.tokenizers.Tokenizer`: `encode`
    (source side, no special tokens), `encode_sequence` (either side, + </s>), `decode`
    (target side), and the special-token ids."""

    marian: MarianTokenizer

    @property
    def pad_id(self) -> int:
        return self.marian.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.marian.eos_token_id

    @property
    def unk_id(self) -> int:
        return self.marian.unk_token_id

    cls_id = sep_id = mask_id = None

    @property
    def vocab_size(self) -> int:
        return self.marian.vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        return self.marian.special_ids

    def encode(self, text: str) -> list[int]:
        """Source text -> ids, without </s>."""
        return self.marian.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_sequence(self, text: str, max_len: int, *, target: bool = False) -> list[int]:
        """Source (or target) text -> at most max_len ids ending with </s>."""
        if max_len < 2:
            raise DataError(f"a sequence of at most {max_len} tokens leaves no room for text")
        return self.marian.encode(text, target=target, max_length=max_len)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Target ids -> text."""
        return self.marian.decode(ids, skip_special_tokens=skip_special_tokens)
