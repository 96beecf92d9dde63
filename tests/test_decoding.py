"""Greedy CTC decoding: collapse rules, chunk independence, word timings and confidences."""

from __future__ import annotations

import math

import pytest
import torch

from asr.decoding import GreedyCTCStream, emissions_to_words, greedy_decode
from asr.text import Vocab

V = Vocab()
FRAME_S = 0.04


def path_log_probs(path: list[int], p_best: float = 0.9) -> torch.Tensor:
    """(T, V) log-probabilities whose best path is `path`, with probability p_best on it."""
    rest = (1 - p_best) / (len(V) - 1)
    probs = torch.full((len(path), len(V)), rest)
    probs[torch.arange(len(path)), torch.tensor(path)] = p_best
    return probs.log()


def ids(text: str) -> list[int]:
    return V.encode(text)


@pytest.mark.parametrize("path,expected", [
    ([], ""),
    ([0, 0, 0], ""),
    (ids("a") * 5, "a"),  # repeats collapse
    (ids("a") + [0] + ids("a"), "aa"),  # a blank separates a real double letter
    ([0, *ids("h"), *ids("h"), 0, *ids("i"), 0], "hi"),
    (ids("ab") + ids("b") + [0] + ids("b") + ids("a"), "abba"),
])
def test_greedy_collapse(path, expected):
    lp = path_log_probs(path) if path else torch.zeros(0, len(V))
    stream = GreedyCTCStream()
    stream.push(lp)
    assert V.decode(e.token for e in stream.emissions) == expected
    batch = greedy_decode(lp[None], torch.tensor([len(path)])) if path else [[]]
    assert V.decode(batch[0]) == expected


def test_a_repeat_across_a_chunk_boundary_is_emitted_once():
    path = [0, *ids("ll"), 0, *ids("l"), 0]
    lp = path_log_probs(path)
    for cut in range(len(path) + 1):
        s = GreedyCTCStream()
        s.push(lp[:cut])
        s.push(lp[cut:])
        assert V.decode(e.token for e in s.emissions) == "ll"
        assert [(e.start, e.end) for e in s.emissions] == [(1, 3), (4, 5)]


def test_batch_decoding_respects_lengths():
    a = path_log_probs([0, *ids("go"), 0])
    b = path_log_probs([*ids("no"), 0, 0, 0, 0])
    lp = torch.stack([torch.cat([a, path_log_probs(ids("xx"))]), b])  # a's padding would add "x"
    assert [V.decode(x) for x in greedy_decode(lp, torch.tensor([4, 6]))] == ["go", "no"]


def test_word_timings_and_confidences():
    #        frame: 0  1  2  3  4  5  6  7  8  9
    path = [0, *ids("hh"), *ids("e"), 0, *ids(" "), 0, *ids("y"), *ids("o"), 0]
    lp = path_log_probs(path, p_best=0.8)
    s = GreedyCTCStream()
    s.push(lp)
    words = emissions_to_words(s.emissions, V, FRAME_S, offset_s=2.0)
    assert [w.word for w in words] == ["he", "yo"]
    assert words[0].start == pytest.approx(2.0 + 1 * FRAME_S)
    assert words[0].end == pytest.approx(2.0 + 4 * FRAME_S)
    assert words[1].start == pytest.approx(2.0 + 7 * FRAME_S)
    assert words[1].end == pytest.approx(2.0 + 9 * FRAME_S)
    for w in words:
        assert w.confidence == pytest.approx(0.8, rel=1e-5)
        assert 0 < w.confidence <= 1


def test_confidence_reflects_the_posteriors():
    lp = torch.cat([path_log_probs(ids("a"), 0.99), path_log_probs([*ids(" ")], 0.9),
                    path_log_probs(ids("b"), 0.3)])
    s = GreedyCTCStream()
    s.push(lp)
    a, b = emissions_to_words(s.emissions, V, FRAME_S)
    assert a.confidence == pytest.approx(0.99, rel=1e-5)
    assert b.confidence == pytest.approx(0.3, rel=1e-5)
    d = b.to_dict()
    assert set(d) == {"word", "start", "end", "confidence"} and d["confidence"] == 0.3


def test_words_from_random_posteriors_are_ordered_and_in_range():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(400, len(V)) * 3, dim=-1)
    s = GreedyCTCStream()
    for chunk in lp.split(37):
        s.push(chunk)
    words = emissions_to_words(s.emissions, V, FRAME_S)
    assert words
    for w in words:
        assert 0 <= w.start < w.end <= 400 * FRAME_S + 1e-9
        assert 0 < w.confidence <= 1 and not math.isnan(w.confidence)
        assert " " not in w.word and w.word
    assert all(a.end <= b.start for a, b in zip(words, words[1:], strict=False))


def test_reset():
    s = GreedyCTCStream()
    s.push(path_log_probs(ids("a")))
    s.reset()
    s.push(path_log_probs(ids("a")))  # not a continuation of the previous "a"
    assert len(s.emissions) == 1 and s.emissions[0].start == 0
