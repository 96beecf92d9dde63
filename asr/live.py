"""The one loop shared by `asr listen` (microphone) and `asr transcribe --stream` (file):
chunks in, StreamingSession events out, printed as a redrawn partial line or as JSON lines."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from .beam import BeamConfig
from .checkpoint import LoadedModel
from .streaming import StreamEvent, StreamingSession
from .transcribe import Transcript


class EventPrinter:
    """text: partial line redrawn in place on a terminal, final lines kept; jsonl: one event per line."""

    def __init__(self, fmt: str = "text", out: TextIO | None = None, extra: dict | None = None):
        self.out = out if out is not None else sys.stdout
        self.fmt = fmt
        self.extra = extra or {}  # jsonl: fields added to every event (e.g. the input file)
        self.tty = self.out.isatty()
        self._partial_len = 0

    def __call__(self, ev: StreamEvent) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps({**self.extra, **ev.to_dict()}) + "\n")
        elif ev.kind == "partial":
            if not self.tty:
                return  # only final lines go to pipes and files in text mode
            width = max(20, shutil.get_terminal_size().columns - 1)
            line = ev.text[-width:]  # the newest words; a wrapped line could not be redrawn
            self.out.write("\r" + line + " " * max(0, self._partial_len - len(line)))
            self._partial_len = len(line)
        else:
            pad = " " * max(0, self._partial_len - len(ev.text)) if self.tty else ""
            self.out.write(("\r" if self.tty else "") + ev.text + pad + "\n")
            self._partial_len = 0
        self.out.flush()


def run_stream(session: StreamingSession, chunks: Iterable[np.ndarray],
               on_event=None, keep: bool = True) -> list[StreamEvent]:
    """Push every chunk, then flush (also on Ctrl-C); returns the final events.

    The chunk source is closed (a microphone stops) before the flush. With keep=False nothing is
    accumulated and the list is empty: for endless streams whose events go to `on_event`.
    """
    finals: list[StreamEvent] = []

    def handle(events):
        for ev in events:
            if keep and ev.kind == "final":
                finals.append(ev)
            if on_event is not None:
                on_event(ev)

    try:
        for chunk in chunks:
            handle(session.push(chunk))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
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
                    fmt: str = "text", beam: BeamConfig | None = None, out: TextIO | None = None,
                    extra: dict | None = None, restart_mean_on_endpoint: bool = False) -> Transcript:
    """A file through the live path; prints events as `listen` would when `echo` (to `out`,
    default stdout; `extra`: fields added to each jsonl event).
    `beam`: beam search with a word LM instead of greedy decoding; `restart_mean_on_endpoint`: see
    `StreamingSession`."""
    rate = lm.feature_config.sample_rate
    session = StreamingSession(lm, endpoint_ms=endpoint_ms, beam=beam, partials=echo,
                               restart_mean_on_endpoint=restart_mean_on_endpoint)
    printer = EventPrinter(fmt, out, extra) if echo else None
    t0 = time.perf_counter()
    finals = run_stream(session, paced(wave, rate * chunk_ms // 1000, rate, realtime), printer)
    return finals_to_transcript(lm, finals, len(wave) / rate, time.perf_counter() - t0)


class WavRecorder:
    """A 16-bit mono WAV written while audio arrives, to a temporary file renamed over `path` by
    close(), so the file is never half-written (also after Ctrl-C)."""

    def __init__(self, path: str | os.PathLike, sample_rate: int):
        import soundfile as sf

        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._failed = False
        try:
            self._file = sf.SoundFile(str(self._tmp), "w", samplerate=sample_rate, channels=1,
                                      format="WAV", subtype="PCM_16")
        except (RuntimeError, OSError) as e:  # soundfile's errors are RuntimeErrors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(f"cannot write {self.path}: {msg}") from None

    def tee(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass `chunks` through, writing each; closing this closes the source."""
        it = iter(chunks)
        try:
            for chunk in it:
                try:
                    self._file.write(np.clip(chunk, -1.0, 1.0))
                except (RuntimeError, OSError) as e:  # e.g. the disk is full
                    self._failed = True
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise OSError(f"cannot write {self.path}: {msg}") from None
                yield chunk
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """Rename the finished file over `path`; after a failed write, drop it and leave `path` as
        it was."""
        if not self._file.closed:
            try:
                self._file.close()
            except (RuntimeError, OSError):
                self._failed = True
            if self._failed:
                self._tmp.unlink(missing_ok=True)
            else:
                os.replace(self._tmp, self.path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` ends a live session like Ctrl-C: flushed, audio saved


@dataclass
class ListenResult:
    seconds: float  # audio captured
    sample_rate: int  # capture rate (Hz)
    overflows: int  # input overflows PortAudio reported
    utterances: int  # final events printed
    interrupted: bool  # ended by Ctrl-C
    error: str | None  # why capture ended early (device lost), else None


OVERFLOW_WARN_S = 10.0  # at most one overflow warning per this many seconds of wall time


def _warn_overflows(chunks: Iterable[np.ndarray], mic, warn: Callable[[str], None]
                    ) -> Iterator[np.ndarray]:
    """Pass the blocks through; when PortAudio has reported new input overflows (audio dropped
    because the machine fell behind), say so, at most once per OVERFLOW_WARN_S."""
    warned, last = 0, -math.inf
    for block in chunks:
        if mic.overflows > warned and (now := time.monotonic()) - last >= OVERFLOW_WARN_S:
            warn(f"warning: input overflow: audio was dropped ({mic.overflows} block(s) so far); "
                 f"the machine is not keeping up, try a larger --chunk-ms or close other programs")
            warned, last = mic.overflows, now
        yield block


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def listen(lm: LoadedModel, mic, fmt: str = "text", endpoint_ms: float | None = 800.0,
           max_seconds: float | None = None, save_audio: str | os.PathLike | None = None,
           out: TextIO | None = None, beam: BeamConfig | None = None,
           warn: Callable[[str], None] = _stderr_line,
           restart_mean_on_endpoint: bool = False) -> ListenResult:
    """Transcribe an open `asr.mic.Microphone` live until max_seconds, Ctrl-C or device loss.

    Ctrl-C is not an error: the current utterance is flushed and printed, the result says
    interrupted. The audio is saved (atomically) to `save_audio` in every case. Input overflows
    never stop the session: they are counted and reported through `warn` (rate-limited).
    """
    session = StreamingSession(lm, sample_rate=mic.sample_rate, endpoint_ms=endpoint_ms, beam=beam,
                               restart_mean_on_endpoint=restart_mean_on_endpoint)
    printer = EventPrinter(fmt, out)
    n_final = 0

    def on_event(ev: StreamEvent) -> None:
        nonlocal n_final
        n_final += ev.kind == "final"
        printer(ev)

    recorder = WavRecorder(save_audio, mic.sample_rate) if save_audio else None
    chunks = _warn_overflows(mic.chunks(max_seconds), mic, warn)
    interrupted = False
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        run_stream(session, recorder.tee(chunks) if recorder else chunks, on_event, keep=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
        if recorder is not None:
            recorder.close()
    return ListenResult(mic.samples / mic.sample_rate, mic.sample_rate, mic.overflows, n_final,
                        interrupted, mic.error)
