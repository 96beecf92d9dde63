"""Greedy CTC decoding with word timings and confidences.

Offline decoding is the streaming decoder fed everything at once, so the two cannot disagree:
`GreedyCTCStream` carries the previous frame's best token across chunk boundaries (a token repeated
across a boundary is emitted once) and extends the last emission while it repeats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .text import Vocab, word_spans

WORD_BREAK_S = 0.8  # a pause at least this long between two characters separates words
# (the default streaming endpoint: utterances it closes never share a word)


@dataclass
class Emission:
    """One emitted CTC token and the output frames [start, end) where it was the best path."""

    token: int
    start: int  # first output frame
    end: int  # one past the last frame of its run of repeats
    logp_sum: float  # sum of its log-probabilities over the run

    @property
    def prob(self) -> float:
        return math.exp(self.logp_sum / (self.end - self.start))


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float  # seconds
    confidence: float  # 0..1, mean per-character posterior along the best path

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(start=round(self.start, 3), end=round(self.end, 3),
                 confidence=round(self.confidence, 3))
        return d


@dataclass
class GreedyCTCStream:
    """Best-path CTC decoder over consecutive log-probability chunks."""

    blank: int = 0
    prev_token: int = 0  # best token of the last frame seen (blank at the start)
    n_frames: int = 0  # output frames consumed so far
    emissions: list[Emission] = field(default_factory=list)

    def push(self, log_probs: Tensor) -> list[Emission]:
        """Consume (T', V) log-probabilities; returns the emissions that started in this chunk."""
        assert log_probs.ndim == 2, tuple(log_probs.shape)
        if log_probs.shape[0] == 0:
            return []
        best_logp, best = log_probs.detach().float().max(dim=-1)
        new: list[Emission] = []
        for t, (tok, lp) in enumerate(zip(best.tolist(), best_logp.tolist(), strict=True)):
            frame = self.n_frames + t
            if tok != self.blank:
                if tok == self.prev_token and self.emissions:
                    last = self.emissions[-1]  # the same run continues
                    last.end = frame + 1
                    last.logp_sum += lp
                else:
                    e = Emission(tok, frame, frame + 1, lp)
                    self.emissions.append(e)
                    new.append(e)
            self.prev_token = tok
        self.n_frames += log_probs.shape[0]
        return new

    def reset(self) -> None:
        self.prev_token = self.blank
        self.n_frames = 0
        self.emissions = []


class Endpointer:
    """The endpoint rule of live decoding: an utterance that has a letter closes after `frames`
    output frames whose best token is blank or space (`frames` None: never)."""

    def __init__(self, vocab: Vocab, frames: int | None):
        self.frames = frames
        self.non_speech = {vocab.blank_id} | ({vocab.space_id} if vocab.space_id is not None else set())
        self.reset()

    def reset(self) -> None:
        self.trailing = 0  # output frames of non-speech since the last letter
        self.has_speech = False  # the current utterance has a letter

    def cuts(self, log_probs: Tensor) -> list[int]:
        """Consume (T', V) log-probabilities; returns the frame indices (exclusive ends) within
        them where utterances close."""
        out = []
        for t, tok in enumerate(log_probs.argmax(dim=-1).tolist()):
            if tok in self.non_speech:
                self.trailing += 1
                if self.frames is not None and self.has_speech and self.trailing >= self.frames:
                    out.append(t + 1)
                    self.has_speech = False
            else:
                self.trailing = 0
                self.has_speech = True
        return out


def break_long_gaps(spans: list[tuple[int, int]], emissions: list[Emission],
                    gap_frames: float) -> list[tuple[int, int]]:
    """Split word spans where consecutive emissions are `gap_frames` or more apart."""
    out = []
    for a, b in spans:
        for i in range(a + 1, b):
            if emissions[i].start - emissions[i - 1].end >= gap_frames:
                out.append((a, i))
                a = i
        out.append((a, b))
    return out


def emissions_to_words(emissions: list[Emission], vocab: Vocab, frame_seconds: float,
                       offset_s: float = 0.0, max_end_s: float | None = None) -> list[Word]:
    """Group character emissions into words with times (seconds) and confidences.

    A space token or a pause of WORD_BREAK_S without emissions ends a word (so an utterance
    closed by a streaming endpoint never shares a word with the next one). The last output frame
    may reach past the audio (frames are 20 or 40 ms); `max_end_s`, the end of the audio, clamps the times.
    """
    chars = [vocab.tokens[e.token] for e in emissions]
    limit = float("inf") if max_end_s is None else max_end_s
    words = []
    for a, b in break_long_gaps(word_spans(chars), emissions, WORD_BREAK_S / frame_seconds):
        span = emissions[a:b]
        end = min(offset_s + span[-1].end * frame_seconds, limit)
        words.append(Word(
            word="".join(chars[a:b]),
            start=min(offset_s + span[0].start * frame_seconds, end),
            end=end,
            confidence=sum(e.prob for e in span) / len(span)))
    return words


def greedy_decode(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Batch best-path decoding: (B, T', V), (B,) -> token ids per utterance (collapsed, no blanks)."""
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for b, n in enumerate(lengths.tolist()):
        seq = torch.unique_consecutive(best[b, :n]).tolist()
        out.append([t for t in seq if t != blank])
    return out
