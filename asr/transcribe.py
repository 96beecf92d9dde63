"""Whole-file transcription: long audio cut at pauses into bounded windows, output writers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .checkpoint import LoadedModel
from .decoding import GreedyCTCStream, Word, emissions_to_words
from .features import log_mel

MAX_WINDOW_S = 30.0  # longest piece decoded at once by the offline model
STEP_BLOCK_FRAMES = 3000  # causal models step through long input in 30 s feature blocks


@dataclass
class Transcript:
    text: str
    words: list[Word] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    model: str = ""
    processing_time: float = 0.0  # seconds

    def to_dict(self) -> dict:
        return {"text": self.text, "duration": round(self.duration, 3), "model": self.model,
                "processing_time": round(self.processing_time, 3),
                "words": [w.to_dict() for w in self.words]}


def split_at_pauses(wave: np.ndarray, max_window_s: float = MAX_WINDOW_S,
                    sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Cut points (start, end) in samples, each piece at most max_window_s, cut at the quietest
    200 ms in the second half of each window."""
    n = len(wave)
    max_len = int(max_window_s * sample_rate)
    if n <= max_len:
        return [(0, n)]
    hop = sample_rate // 100  # 10 ms energy frames
    n_frames = n // hop
    energy = (wave[: n_frames * hop].reshape(n_frames, hop).astype(np.float64) ** 2).mean(1)
    smooth = np.convolve(energy, np.ones(20) / 20, mode="same")  # 200 ms
    pieces, start = [], 0
    while n - start > max_len:
        lo, hi = (start + max_len // 2) // hop, (start + max_len) // hop
        cut = (lo + int(np.argmin(smooth[lo:hi]))) * hop
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


def decode_wave(lm: LoadedModel, wave: np.ndarray) -> tuple[list[Word], str]:
    """Words and text of one utterance; long input is handled in bounded memory."""
    frame_s = lm.frame_seconds
    if not lm.model.cfg.bidirectional:
        # causal model: step through fixed feature blocks; exactly forward() on the whole input
        feats = lm.stats.normalize(log_mel(wave, lm.feature_config))
        state = lm.model.init_state(device=lm.device)
        dec = GreedyCTCStream()
        with torch.inference_mode():
            for s in range(0, feats.shape[0], STEP_BLOCK_FRAMES):
                lp, state = lm.model.step(feats[None, s:s + STEP_BLOCK_FRAMES].to(lm.device), state)
                dec.push(lp[0])
        words = emissions_to_words(dec.emissions, lm.vocab, frame_s)
        return words, " ".join(w.word for w in words)
    words: list[Word] = []
    for a, b in split_at_pauses(wave, sample_rate=lm.feature_config.sample_rate):
        feats = lm.stats.normalize(log_mel(wave[a:b], lm.feature_config))
        if feats.shape[0] == 0:
            continue
        with torch.inference_mode():
            lp, _ = lm.model(feats[None].to(lm.device), torch.tensor([feats.shape[0]]))
        dec = GreedyCTCStream()
        dec.push(lp[0])
        words += emissions_to_words(dec.emissions, lm.vocab, frame_s,
                                    offset_s=a / lm.feature_config.sample_rate)
    return words, " ".join(w.word for w in words)


def transcribe_wave(lm: LoadedModel, wave: np.ndarray) -> Transcript:
    t0 = time.perf_counter()
    words, text = decode_wave(lm, wave)
    return Transcript(text, words, len(wave) / lm.feature_config.sample_rate, lm.name,
                      time.perf_counter() - t0)


# ----------------------------------------------------------------------------- writers


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cues(words: list[Word], max_words: int = 12, max_gap_s: float = 1.0,
         max_cue_s: float = 6.0) -> list[tuple[float, float, str]]:
    """Subtitle cues: words grouped until a pause, a length or a duration limit."""
    out: list[tuple[float, float, str]] = []
    cur: list[Word] = []
    for w in words:
        if cur and (len(cur) >= max_words or w.start - cur[-1].end > max_gap_s
                    or w.end - cur[0].start > max_cue_s):
            out.append((cur[0].start, cur[-1].end, " ".join(x.word for x in cur)))
            cur = []
        cur.append(w)
    if cur:
        out.append((cur[0].start, cur[-1].end, " ".join(x.word for x in cur)))
    return out


def format_transcript(t: Transcript, fmt: str) -> str:
    """txt | json | srt | vtt text of a transcript."""
    if fmt == "txt":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps(t.to_dict(), indent=1) + "\n"
    if fmt == "srt":
        return "".join(f"{i}\n{_ts(a, ',')} --> {_ts(b, ',')}\n{text}\n\n"
                       for i, (a, b, text) in enumerate(cues(t.words), 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_ts(a, '.')} --> {_ts(b, '.')}\n{text}\n\n"
                                      for a, b, text in cues(t.words))
    raise ValueError(f"unknown format {fmt!r}")
