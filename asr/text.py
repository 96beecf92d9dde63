"""Text normalisation (one definition for training targets and for WER) and the character vocabulary."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

BLANK = "<blank>"
DEFAULT_CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # index 0 is the CTC blank; these follow it

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015_/]+")  # hyphens and dashes split words
_DROP = re.compile(r"[^\w' ]+")  # remaining punctuation and symbols vanish
_EDGE_APOSTROPHES = re.compile(r"(?<![\w])'+|'+(?![\w])")  # quotes, not contractions


def normalize_text(text: str) -> str:
    """Lower case, ASCII letters, apostrophes only inside words, single spaces.

    "Don't  STOP -- the `café`!" -> "don't stop the cafe". Digits and letters outside the
    vocabulary are kept (so WER still sees them) and rejected by `Vocab.encode`.
    Idempotent: normalize_text(normalize_text(s)) == normalize_text(s).
    """
    s = unicodedata.normalize("NFKD", text)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.translate(_APOSTROPHES).lower()
    s = _SEPARATORS.sub(" ", s)
    s = _DROP.sub("", s).replace("_", "")
    s = _EDGE_APOSTROPHES.sub("", s)
    return " ".join(s.split())


class UnknownCharacterError(ValueError):
    """Training text contains characters the vocabulary cannot spell."""


class Vocab:
    """Characters with the CTC blank at index 0."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        assert len(set(chars)) == len(chars), "duplicate characters in vocabulary"
        self.chars = chars
        self.tokens = [BLANK, *chars]
        self._index = {c: i + 1 for i, c in enumerate(chars)}
        self.space_id = self._index.get(" ")

    @property
    def blank_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.tokens)

    def unknown_chars(self, text: str) -> set[str]:
        return {c for c in text if c not in self._index}

    def encode(self, text: str) -> list[int]:
        """Normalised text -> token ids. Raises UnknownCharacterError naming the characters."""
        bad = self.unknown_chars(text)
        if bad:
            shown = ", ".join(repr(c) for c in sorted(bad))
            raise UnknownCharacterError(f"characters not in the vocabulary: {shown}")
        return [self._index[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids (blanks allowed, no CTC collapse) -> text."""
        return "".join(self.tokens[i] for i in ids if i != 0)

    def to_dict(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["chars"])


def word_spans(chars: Sequence[str]) -> list[tuple[int, int]]:
    """Index ranges [start, end) of the words in a character sequence (space separated)."""
    spans, start = [], None
    for i, c in enumerate(chars):
        if c == " ":
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(chars)))
    return spans
