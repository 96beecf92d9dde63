"""Whole-file transcription: long audio cut at pauses into bounded windows, output writers."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import SAMPLE_RATE, iter_audio, iter_chunks
from .beam import BeamConfig, EndpointedBeam, beam_decode
from .checkpoint import LoadedModel
from .decoding import Emission, GreedyCTCStream, Word, emissions_to_words
from .features import OnlineLogMel

MAX_WINDOW_S = 30.0  # longest piece decoded at once by the offline model
STEP_BLOCK_FRAMES = 3000  # causal models step through long input in 30 s feature blocks
SMOOTH_FRAMES = 20  # 10 ms energy frames averaged when looking for a pause (200 ms)
BEAM_ENDPOINT_MS = 800.0  # causal model + beam: utterances close where StreamingSession's do


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


def iter_windows(blocks: Iterable[np.ndarray], max_window_s: float = MAX_WINDOW_S,
                 sample_rate: int = SAMPLE_RATE) -> Iterator[tuple[int, np.ndarray]]:
    """Cut a stream of sample blocks into pieces of at most max_window_s, each cut at the quietest
    200 ms in the second half of its window. Yields (start sample, piece); memory stays within one
    window plus one block, and the cuts do not depend on how the stream is split into blocks."""
    max_len = int(max_window_s * sample_rate)
    hop = sample_rate // 100  # 10 ms energy frames
    # the 200 ms smoothing looks SMOOTH_FRAMES // 2 frames past the search range: wait for them
    need = max_len + (SMOOTH_FRAMES + 1) * hop
    parts: list[np.ndarray] = []
    held, start = 0, 0
    for block in blocks:
        parts.append(block)
        held += len(block)
        if held <= need:
            continue
        buf = np.concatenate(parts)
        while len(buf) > need:
            cut = _quietest_cut(buf, max_len, hop)
            yield start, buf[:cut]
            buf, start = buf[cut:], start + cut
        parts, held = [buf], len(buf)
    buf = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    while len(buf) > max_len:
        cut = _quietest_cut(buf, max_len, hop)
        yield start, buf[:cut]
        buf, start = buf[cut:], start + cut
    if len(buf):
        yield start, buf


def _quietest_cut(buf: np.ndarray, max_len: int, hop: int) -> int:
    """Sample index (a multiple of hop) of the quietest smoothed 10 ms frame in buf[max_len/2 : max_len]."""
    n_frames = len(buf) // hop
    energy = np.square(buf[: n_frames * hop].reshape(n_frames, hop), dtype=np.float64).mean(1)
    smooth = np.convolve(energy, np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES, mode="same")
    lo, hi = (max_len // 2) // hop, max_len // hop
    return (lo + int(np.argmin(smooth[lo:hi]))) * hop


def split_at_pauses(wave: np.ndarray, max_window_s: float = MAX_WINDOW_S,
                    sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Cut points (start, end) in samples of `iter_windows` over a whole signal."""
    return [(a, a + len(piece)) for a, piece in iter_windows([wave], max_window_s, sample_rate)]


def decode_blocks(lm: LoadedModel, blocks: Iterable[np.ndarray],
                  beam: BeamConfig | None = None) -> tuple[list[Word], int]:
    """Words of one recording given as consecutive sample blocks, and its length in samples.

    Memory is bounded by one ~30 s window (offline model) or one block (causal model), whatever
    the length of the recording. `beam`: beam search with a word LM instead of greedy decoding;
    a causal model's recording is then searched utterance by utterance, cut at pauses exactly as
    the default `StreamingSession` cuts it (bounded memory, and the same final text).
    """
    frame_s = lm.frame_seconds
    sr = lm.feature_config.sample_rate
    n_samples = 0
    if not lm.model.cfg.bidirectional:
        # causal model: exact streaming features and step(); equals forward() on the whole input
        featurizer = OnlineLogMel(lm.feature_config, lm.stats)
        state = lm.model.init_state(device=lm.device)
        dec = GreedyCTCStream()
        seg = None if beam is None else _endpointed_beam(lm, beam)
        emissions: list[Emission] = []
        with torch.inference_mode():
            for block in itertools.chain(blocks, [None]):  # None: end of input
                if block is None:
                    feats = featurizer.finish()
                else:
                    n_samples += len(block)
                    feats = featurizer.accept(block)
                for s in range(0, feats.shape[0], STEP_BLOCK_FRAMES):
                    lp, state = lm.model.step(feats[None, s:s + STEP_BLOCK_FRAMES].to(lm.device), state)
                    if seg is None:
                        dec.push(lp[0])
                    else:
                        emissions += [e for u in seg.push(lp[0]) for e in u]
        if seg is None:
            emissions = dec.emissions
        else:
            emissions += [e for u in seg.flush() for e in u]
        return emissions_to_words(emissions, lm.vocab, frame_s, max_end_s=n_samples / sr), n_samples
    words: list[Word] = []
    for a, piece in iter_windows(blocks, sample_rate=sr):
        n_samples = a + len(piece)
        feats = lm.features(piece)
        if feats.shape[0] == 0:
            continue
        with torch.inference_mode():
            lp, _ = lm.model(feats[None].to(lm.device), torch.tensor([feats.shape[0]]))
        if beam is None:
            dec = GreedyCTCStream()
            dec.push(lp[0])
            emissions = dec.emissions
        else:
            emissions = beam_decode(lp[0], lm.vocab, beam)
        words += emissions_to_words(emissions, lm.vocab, frame_s, offset_s=a / sr,
                                    max_end_s=n_samples / sr)
    return words, n_samples


def _endpointed_beam(lm: LoadedModel, beam: BeamConfig) -> EndpointedBeam:
    frames = max(1, round(BEAM_ENDPOINT_MS / 1000 / lm.frame_seconds))
    return EndpointedBeam(lm.vocab, beam, endpoint_frames=frames)


def decode_wave(lm: LoadedModel, wave: np.ndarray,
                beam: BeamConfig | None = None) -> tuple[list[Word], str]:
    """Words and text of one utterance held in memory (greedy, or `beam` search with an LM)."""
    words, _ = decode_blocks(lm, iter_chunks(wave, lm.feature_config.sample_rate * 10), beam)
    return words, " ".join(w.word for w in words)


def transcribe_wave(lm: LoadedModel, wave: np.ndarray, beam: BeamConfig | None = None) -> Transcript:
    t0 = time.perf_counter()
    words, text = decode_wave(lm, wave, beam)
    return Transcript(text, words, len(wave) / lm.feature_config.sample_rate, lm.name,
                      time.perf_counter() - t0)


def transcribe_file(lm: LoadedModel, path: str | os.PathLike,
                    beam: BeamConfig | None = None) -> Transcript:
    """Transcribe an audio file of any length, decoding it block by block (bounded memory).

    Raises:
        AudioError: the file cannot be used (see `asr.audio.iter_audio`).
    """
    t0 = time.perf_counter()
    words, n = decode_blocks(lm, iter_audio(path, lm.feature_config.sample_rate), beam)
    return Transcript(" ".join(w.word for w in words), words, n / lm.feature_config.sample_rate,
                      lm.name, time.perf_counter() - t0)


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
