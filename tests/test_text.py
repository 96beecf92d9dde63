"""The one text normaliser (training targets and WER) and the character vocabulary."""

from __future__ import annotations

import pytest
from conftest import CORPUS, sample_reference

from asr.text import DEFAULT_CHARS, UnknownCharacterError, Vocab, normalize_text, word_spans

CASES = [
    # case
    ("HE WAS NOT AN ILL DISPOSED YOUNG MAN", "he was not an ill disposed young man"),
    ("Mixed CaSe", "mixed case"),
    # apostrophes: straight, curly, backtick and acute all become ' inside words
    ("don't", "don't"),
    ("It\u2019s Mary\u2019s", "it's mary's"),
    ("rock `n\u00b4 roll", "rock n roll"),
    ("o\u02bcclock", "o'clock"),
    # quotes around words are not apostrophes
    ("\u2018quoted\u2019 'single' \"double\"", "quoted single double"),
    ("the dogs' bones", "the dogs bones"),
    # punctuation vanishes
    ("Hello, world! How are you? Fine; thanks: bye.", "hello world how are you fine thanks bye"),
    ("MR. SMITH (aged 40) & co.", "mr smith aged 40 co"),
    ("...", ""),
    # hyphens, dashes, slashes and underscores separate words
    ("well-known e-mail", "well known e mail"),
    ("yes\u2014no\u2013maybe", "yes no maybe"),
    ("and/or snake_case", "and or snake case"),
    # whitespace of every kind collapses to single spaces, none at the ends
    ("  tab\there\nnew line\u00a0nbsp  ", "tab here new line nbsp"),
    ("", ""),
    # accents and compatibility forms fold to ASCII where there is an ASCII letter
    ("Na\u00efve fa\u00e7ade \u00dcber S\u00e3o \u00c5ngstr\u00f6m", "naive facade uber sao angstrom"),
    ("cafe\u0301", "cafe"),  # combining accent
    ("\ufb01ne", "fine"),  # ligature
    # letters without an ASCII form and digits are kept for WER, then refused by Vocab.encode
    ("stra\u00dfe 42", "stra\u00dfe 42"),
]


@pytest.mark.parametrize("raw,expected", CASES)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw", [raw for raw, _ in CASES])
def test_normalize_text_is_idempotent(raw):
    once = normalize_text(raw)
    assert normalize_text(once) == once


def test_corpus_transcripts_are_already_normal_after_lower_casing():
    """LibriSpeech-style transcripts only change case: the normaliser never alters their words."""
    lines = [ln.split(" ", 1)[1] for t in CORPUS.rglob("*.trans.txt") for ln in t.read_text().splitlines()]
    assert len(lines) >= 10
    for text in lines:
        assert normalize_text(text) == text.lower()
    assert normalize_text(sample_reference("9300-1-0087")).startswith("and mister john dashwood")


def test_vocab_layout():
    v = Vocab()
    assert v.blank_id == 0 and v.tokens[0] == "<blank>"
    assert len(v) == 1 + len(DEFAULT_CHARS) == 29
    assert v.space_id == v.tokens.index(" ")


def test_encode_decode_round_trip():
    v = Vocab()
    text = "he wasn't an ill disposed young man"
    ids = v.encode(text)
    assert 0 not in ids and len(ids) == len(text)
    assert v.decode(ids) == text
    assert v.decode([0, *ids[:2], 0, 0, *ids[2:], 0]) == text  # blanks are skipped, nothing collapsed


def test_encode_names_every_unknown_character():
    with pytest.raises(UnknownCharacterError) as e:
        Vocab().encode("stra\u00dfe 42 ok")
    msg = str(e.value)
    for c in ("'\u00df'", "'4'", "'2'"):
        assert c in msg
    assert "'o'" not in msg


def test_encode_refuses_unnormalised_text_instead_of_dropping_it():
    with pytest.raises(UnknownCharacterError, match="'H'"):
        Vocab().encode("Hello")


def test_vocab_round_trips_through_a_dict():
    v = Vocab("ab '")
    w = Vocab.from_dict(v.to_dict())
    assert w.tokens == v.tokens and w.encode("a b'") == v.encode("a b'")


@pytest.mark.parametrize("chars,spans", [
    ("", []),
    ("ab", [(0, 2)]),
    (" ab  cd ", [(1, 3), (5, 7)]),
    ("a b", [(0, 1), (2, 3)]),
])
def test_word_spans(chars, spans):
    assert word_spans(list(chars)) == spans
