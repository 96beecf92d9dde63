"""The one loop shared by `asr listen` (microphone) and `asr transcribe --stream` (file):
chunks in, StreamingSession events out, printed as a redrawn partial line or as JSON lines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import numpy as np

from .checkpoint import LoadedModel
from .streaming import StreamEvent, StreamingSession
from .transcribe import Transcript


class EventPrinter:
    """text: partial line redrawn in place on a terminal, final lines kept; jsonl: one event per line."""

    def __init__(self, fmt: str = "text", out: TextIO | None = None):
        self.out = out or sys.stdout
        self.fmt = fmt
        self.tty = self.out.isatty()
        self._partial_len = 0

    def __call__(self, ev: StreamEvent) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps(ev.to_dict()) + "\n")
        elif ev.kind == "partial":
            if not self.tty:
                return  # only final lines go to pipes and files in text mode
            line = ev.text[-(200):]
            self.out.write("\r" + line + " " * max(0, self._partial_len - len(line)))
            self._partial_len = len(line)
        else:
            pad = " " * max(0, self._partial_len - len(ev.text)) if self.tty else ""
            self.out.write(("\r" if self.tty else "") + ev.text + pad + "\n")
            self._partial_len = 0
        self.out.flush()


def run_stream(session: StreamingSession, chunks: Iterable[np.ndarray],
               on_event=None) -> list[StreamEvent]:
    """Push every chunk, then flush (also on Ctrl-C); returns the final events."""
    finals: list[StreamEvent] = []

    def handle(events):
        for ev in events:
            if ev.kind == "final":
                finals.append(ev)
            if on_event is not None:
                on_event(ev)

    try:
        for chunk in chunks:
            handle(session.push(chunk))
    finally:
        handle(session.flush())
    return finals


def finals_to_transcript(lm: LoadedModel, finals: list[StreamEvent], seconds: float,
                         elapsed: float) -> Transcript:
    words = [w for e in finals for w in e.words]
    return Transcript(" ".join(e.text for e in finals if e.text), words, seconds, lm.name, elapsed)


def paced(wave: np.ndarray, chunk_samples: int, sample_rate: int, realtime: bool):
    """Chunks of a waveform, optionally released at the pace of the audio itself."""
    t0 = time.monotonic()
    for i, s in enumerate(range(0, len(wave), chunk_samples)):
        if realtime:
            due = t0 + (i * chunk_samples) / sample_rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield wave[s:s + chunk_samples]


def run_file_stream(lm: LoadedModel, wave: np.ndarray, chunk_ms: int = 100,
                    endpoint_ms: float | None = 800.0, realtime: bool = False, echo: bool = True,
                    fmt: str = "text") -> Transcript:
    """A file through the live path; prints events as `listen` would when `echo`."""
    rate = lm.feature_config.sample_rate
    session = StreamingSession(lm, endpoint_ms=endpoint_ms)
    printer = EventPrinter(fmt) if echo else None
    t0 = time.perf_counter()
    finals = run_stream(session, paced(wave, rate * chunk_ms // 1000, rate, realtime), printer)
    return finals_to_transcript(lm, finals, len(wave) / rate, time.perf_counter() - t0)
