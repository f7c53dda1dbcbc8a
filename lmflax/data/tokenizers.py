"""Tokenizers from Hugging Face's `tokenizers`: byte-level BPE (GPT) and WordPiece (BERT),
trained on a dataset's training split and cached, or loaded from a tokenizer.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmflax.data.sources import DataError

BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KINDS = ("bpe", "wordpiece")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids the pipelines and models need.

    For BPE, eos_id (<|endoftext|>) also starts documents, as in GPT-2. For WordPiece, the BERT
    tokens [CLS] [SEP] [MASK] [PAD] [UNK] are set. Ids that a tokenizer lacks are None.
    A Hugging Face directory's tokenizer also carries its bos_id, its chat template (Jinja text,
    lmflax.data.chat) and its special tokens by role ((('eos_token', '</s>'), ...)), which
    chat templates read.
    """

    backend: tokenizers.Tokenizer
    pad_id: int
    eos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    unk_id: int | None = None
    bos_id: int | None = None
    chat_template: str | None = None
    special_tokens: tuple[tuple[str, str], ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        ids = (self.pad_id, self.eos_id, self.cls_id, self.sep_id, self.mask_id)
        return tuple(sorted({i for i in ids if i is not None}))

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_sequence(self, text: str, max_len: int, *, target: bool = False) -> list[int]:
        """Text -> the ids of one model input of at most max_len tokens, framed as this
        tokenizer frames a sequence: with its post-processor's special tokens (a Hugging Face
        tokenizer's: BART's <s> ... </s>, T5's ... </s>), the text truncated first so that they
        fit (as transformers truncates); with none (lmflax's trained tokenizers), the text's
        first max_len - 1 tokens + the end token (EOS, else [SEP]). `target` is for tokenizers
        with a separate target side (Marian); this one has one side."""
        del target
        specials = self.backend.num_special_tokens_to_add(False)
        if specials == 0:
            end = self.eos_id if self.eos_id is not None else self.sep_id
            if end is None:
                raise DataError("this tokenizer has no end token (EOS or [SEP]) to end sequences")
            return [*self.encode(text)[: max_len - 1], end]
        if max_len <= specials:
            raise DataError(
                f"a sequence of at most {max_len} tokens leaves no room for text: this "
                f"tokenizer adds {specials} special tokens"
            )
        encoding = self.backend.encode(text, add_special_tokens=False)
        encoding.truncate(max_len - specials)
        return self.backend.post_process(encoding).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @classmethod
    def from_backend(cls, backend: tokenizers.Tokenizer) -> Tokenizer:
        """Wraps a tokenizers.Tokenizer, finding its special tokens by their usual names."""

        def find(*names: str) -> int | None:
            for n in names:
                i = backend.token_to_id(n)
                if i is not None:
                    return i
            return None

        eos = find("<|endoftext|>", "</s>", "<eos>")
        pad = find("[PAD]", "<|pad|>", "<pad>")
        if pad is None:
            pad = eos if eos is not None else 0
        return cls(
            backend=backend,
            pad_id=pad,
            eos_id=eos,
            cls_id=find("[CLS]", "<s>"),
            sep_id=find("[SEP]", "</s>"),
            mask_id=find("[MASK]", "<mask>"),
            unk_id=find("[UNK]", "<unk>"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads a tokenizer.json. A file `tokenizers` cannot read (not JSON, not a tokenizer,
        truncated, a directory) is a DataError naming it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception with serde's message
            raise DataError(
                f"tokenizer file {path} is not a readable tokenizer.json ({e}); it must be a "
                "file saved by Hugging Face `tokenizers` (Tokenizer.save)"
            ) from None
        return cls.from_backend(backend)


def min_vocab_size(kind: str) -> int:
    """The fewest tokens a trained tokenizer of `kind` has, whatever its data and vocab_size:
    byte-level BPE keeps all 256 bytes and its special tokens; WordPiece its special tokens and
    at least one character."""
    if kind == "bpe":
        return len(pre_tokenizers.ByteLevel.alphabet()) + len(BPE_SPECIALS)
    if kind == "wordpiece":
        return len(WORDPIECE_SPECIALS) + 1
    raise ValueError(f"unknown tokenizer kind {kind!r}; accepted: {KINDS}")


def train_tokenizer(kind: str, texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE ('bpe') or lower-cased WordPiece ('wordpiece') tokenizer."""
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(BPE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS), show_progress=False
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; accepted: {KINDS}")
    backend.train_from_iterator(texts, trainer)
    return Tokenizer.from_backend(backend)
