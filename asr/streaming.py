"""Live decoding: a session that turns audio chunks into partial and final text events.

`StreamingSession` is the only object here that holds mutable streaming state: the featurizer's
sample tail, the model's `StreamState`, and the greedy decoder's last token and emissions. With the
hidden state kept across endpoints (the default), the final texts of a session fed any chunking of a
file are exactly the offline transcript of that file, with the same word timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import LoadedModel
from .decoding import GreedyCTCStream, Word, emissions_to_words
from .features import OnlineLogMel
from .transcribe import Transcript


@dataclass
class StreamEvent:
    kind: str  # "partial" (utterance so far) or "final" (utterance closed)
    text: str
    start: float  # seconds from the start of the stream
    end: float
    utterance: int  # 0-based utterance number in this stream
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"type": self.kind, "utterance": self.utterance, "text": self.text,
                "start": round(self.start, 3), "end": round(self.end, 3),
                "words": [w.to_dict() for w in self.words]}


class StreamingSession:
    """Feed audio with push(); read StreamEvents; flush() at the end; reset() for a new stream.

    Args:
        lm: a unidirectional (causal) model.
        sample_rate: rate of the pushed samples; other rates than the model's are resampled
            with a streaming (stateful) resampler.
        endpoint_ms: close an utterance after this much trailing non-speech (CTC blank) once it has
            text; None disables endpointing (only flush() closes).
        reset_on_endpoint: also reset the model's hidden state at each endpoint (default keeps it).
    """

    def __init__(self, lm: LoadedModel, sample_rate: int | None = None,
                 endpoint_ms: float | None = 800.0, reset_on_endpoint: bool = False):
        if lm.model.cfg.bidirectional:
            raise ValueError(f"{lm.path or 'model'}: a bidirectional model cannot stream; "
                             f"use a unidirectional model such as models/gru-stream.pt")
        self.lm = lm
        self.model_rate = lm.feature_config.sample_rate
        self.sample_rate = sample_rate or self.model_rate
        self.endpoint_ms = endpoint_ms
        self.reset_on_endpoint = reset_on_endpoint
        self.frame_s = lm.frame_seconds
        self.reset()

    def reset(self) -> None:
        """Back to the state before any audio."""
        self.featurizer = OnlineLogMel(self.lm.feature_config, self.lm.stats)
        self.state = self.lm.model.init_state(device=self.lm.device)
        self.decoder = GreedyCTCStream()
        self.utterance = 0
        self.n_samples = 0  # samples pushed, at the model's rate
        self._resampler = None
        if self.sample_rate != self.model_rate:
            import soxr

            self._resampler = soxr.ResampleStream(self.sample_rate, self.model_rate, 1, dtype="float32")
        self._trailing_blank = 0  # output frames since the last non-blank best token
        self._last_partial = ""

    @property
    def seconds(self) -> float:
        """Audio time pushed so far."""
        return self.n_samples / self.model_rate

    def _words(self) -> list[Word]:
        return emissions_to_words(self.decoder.emissions, self.lm.vocab, self.frame_s)

    def _run(self, feats: torch.Tensor) -> list[StreamEvent]:
        if feats.shape[0] == 0:
            return []
        with torch.inference_mode():
            lp, self.state = self.lm.model.step(feats[None].to(self.lm.device), self.state)
        lp = lp[0]
        events: list[StreamEvent] = []
        need = None if self.endpoint_ms is None else max(1, round(self.endpoint_ms / 1000 / self.frame_s))
        for t in range(lp.shape[0]):  # 25 frames per second: per-frame Python is cheap
            self.decoder.push(lp[t:t + 1])
            self._trailing_blank = self._trailing_blank + 1 if self.decoder.prev_token == 0 else 0
            if need is not None and self._trailing_blank >= need and self.decoder.emissions:
                events.append(self._final())
        text = " ".join(w.word for w in self._words())
        if text and text != self._last_partial:
            events.append(self._event("partial"))
            self._last_partial = text
        return events

    def _event(self, kind: str) -> StreamEvent:
        words = self._words()
        text = " ".join(w.word for w in words)
        if words:
            start, end = words[0].start, words[-1].end
        else:
            start = end = self.decoder.n_frames * self.frame_s
        return StreamEvent(kind, text, start, end, self.utterance, words)

    def _final(self) -> StreamEvent:
        ev = self._event("final")
        self.utterance += 1
        self.decoder.emissions = []  # the decoder keeps its frame count and last token
        self._last_partial = ""
        if self.reset_on_endpoint:
            self.state = self.lm.model.init_state(device=self.lm.device)
        return ev

    def push(self, samples: np.ndarray) -> list[StreamEvent]:
        """Add audio (mono float32 at `sample_rate`); returns the events it caused."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=False)
        self.n_samples += len(x)
        return self._run(self.featurizer.accept(x))

    def flush(self) -> list[StreamEvent]:
        """End of stream: decode the remaining audio and close the current utterance."""
        events = []
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.n_samples += len(tail)
            events += self._run(self.featurizer.accept(tail))
        events += [e for e in self._run(self.featurizer.finish()) if e.kind == "final"]
        if self.decoder.emissions:
            events.append(self._final())
        return events


def transcribe_stream_wave(lm: LoadedModel, wave: np.ndarray, chunk_samples: int = 1600,
                           endpoint_ms: float | None = 800.0) -> Transcript:
    """A whole waveform through the streaming path (100 ms chunks): the concatenated final texts."""
    import time

    t0 = time.perf_counter()
    session = StreamingSession(lm, endpoint_ms=endpoint_ms)
    finals: list[StreamEvent] = []
    for s in range(0, len(wave), chunk_samples):
        finals += [e for e in session.push(wave[s:s + chunk_samples]) if e.kind == "final"]
    finals += session.flush()
    words = [w for e in finals for w in e.words]
    return Transcript(" ".join(e.text for e in finals if e.text), words,
                      len(wave) / lm.feature_config.sample_rate, lm.name, time.perf_counter() - t0)
