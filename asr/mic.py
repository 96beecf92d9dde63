"""Microphone capture with PortAudio (through sounddevice), decoded outside the audio callback.

The PortAudio callback only copies the first channel of each block into a queue and counts input
overflows; the caller's thread takes the blocks from the queue and runs the model. `sounddevice` is
imported only here and only when a microphone is used: on Linux it raises OSError at import when the
PortAudio library is missing, and every other command must work without it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE

LIST_HINT = "see `asr listen --list-devices`"
STALL_S = 3.0  # no audio for this long from an open stream: the device is gone


class MicrophoneError(RuntimeError):
    """The microphone cannot be used; the one-line message names the fix."""


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError:
        raise MicrophoneError("the PortAudio library is not installed: install it with "
                              "`apt-get install libportaudio2` (Debian/Ubuntu)") from None
    return sd


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


@dataclass(frozen=True)
class InputDevice:
    index: int  # PortAudio device ID
    name: str
    channels: int  # maximum input channels
    default_rate: int  # Hz
    host_api: str
    is_default: bool

    def describe(self) -> str:
        mark = "*" if self.is_default else " "
        return (f"{mark} {self.index:>3}  {self.name}  ({self.host_api}, {self.channels} in, "
                f"{self.default_rate} Hz)")


def list_devices() -> list[InputDevice]:
    """The input devices PortAudio sees (an empty list when there are none)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except sd.PortAudioError as e:
        raise MicrophoneError(f"cannot query audio devices: {_first_line(e)}") from None
    return [InputDevice(i, d["name"], int(d["max_input_channels"]), int(d["default_samplerate"]),
                        apis[d["hostapi"]]["name"], i == default_in)
            for i, d in enumerate(devices) if d["max_input_channels"] > 0]


def resolve_device(spec: int | str | None = None) -> InputDevice:
    """An input device by ID, by (case-insensitive) part of its name, or the default for None."""
    devices = list_devices()
    if not devices:
        raise MicrophoneError(f"no audio input device found ({LIST_HINT}; is a microphone "
                              f"connected and the sound server running?)")
    if spec is None or str(spec).strip() == "":
        default = [d for d in devices if d.is_default]
        if not default:
            raise MicrophoneError(f"no default input device; pick one with --input-device ({LIST_HINT})")
        return default[0]
    s = str(spec).strip()
    if s.lstrip("-").isdigit():
        by_id = [d for d in devices if d.index == int(s)]
        if not by_id:
            raise MicrophoneError(f"no input device with ID {s} ({LIST_HINT})")
        return by_id[0]
    exact = [d for d in devices if d.name.lower() == s.lower()]
    matches = exact or [d for d in devices if s.lower() in d.name.lower()]
    if not matches:
        raise MicrophoneError(f"no input device matches {s!r} ({LIST_HINT})")
    if len(matches) > 1:
        names = ", ".join(f"{d.index} {d.name!r}" for d in matches[:6])
        raise MicrophoneError(f"{s!r} matches several input devices ({names}); "
                              f"give the ID ({LIST_HINT})")
    return matches[0]


class Microphone:
    """An open capture stream: `chunks()` yields mono float32 blocks at `sample_rate`.

    Opens at `sample_rate` if the device supports it, else at the device's default rate (the
    streaming session resamples). Use as a context manager or call close().
    """

    def __init__(self, device: int | str | None = None, sample_rate: int = SAMPLE_RATE,
                 chunk_ms: int = 100):
        sd = _sounddevice()
        self._sd = sd
        self.device = resolve_device(device)
        self.sample_rate, channels = self._settings(sample_rate)
        self.chunk_samples = max(1, self.sample_rate * chunk_ms // 1000)
        self.overflows = 0  # blocks PortAudio reported as overflowed (audio was dropped)
        self.samples = 0  # samples delivered by chunks()
        self.error: str | None = None  # why capture ended early, if it did
        self._queue: queue.Queue[np.ndarray] = queue.Queue()
        self._closed = False

        def callback(indata, frames, time_info, status):  # PortAudio's thread: copy and go
            if status.input_overflow:
                self.overflows += 1
            self._queue.put(indata[:, 0].copy())

        try:
            self._stream = sd.InputStream(device=self.device.index, channels=channels,
                                          samplerate=self.sample_rate, dtype="float32",
                                          blocksize=self.chunk_samples, callback=callback)
        except sd.PortAudioError as e:
            raise MicrophoneError(f"cannot open input device {self.device.index} "
                                  f"{self.device.name!r}: {_first_line(e)} ({LIST_HINT})") from None

    def _settings(self, wanted_rate: int) -> tuple[int, int]:
        """(rate, channels) the device accepts: the wanted rate first, mono first."""
        sd, dev = self._sd, self.device
        last = None
        for rate in dict.fromkeys([wanted_rate, dev.default_rate]):
            for channels in dict.fromkeys([1, dev.channels]):
                try:
                    sd.check_input_settings(device=dev.index, channels=channels, dtype="float32",
                                            samplerate=rate)
                    return rate, channels
                except (sd.PortAudioError, ValueError) as e:
                    last = e
        raise MicrophoneError(f"input device {dev.index} {dev.name!r} cannot capture "
                              f"({_first_line(last)}); pick another ({LIST_HINT})")

    def chunks(self, max_seconds: float | None = None) -> Iterator[np.ndarray]:
        """Start capturing and yield blocks until max_seconds of audio, close(), or device loss.

        Device loss (the stream stops, PortAudio fails, or no audio arrives for STALL_S) ends the
        iteration normally and sets `error`.
        """
        limit = None if max_seconds is None else round(max_seconds * self.sample_rate)
        try:
            self._stream.start()
        except self._sd.PortAudioError as e:
            raise MicrophoneError(f"cannot start input device {self.device.name!r}: "
                                  f"{_first_line(e)} ({LIST_HINT})") from None
        try:
            last_audio = time.monotonic()
            while limit is None or self.samples < limit:
                try:
                    block = self._queue.get(timeout=0.2)
                except queue.Empty:
                    stalled = time.monotonic() - last_audio > STALL_S
                    if not self._stream.active or stalled:
                        self.error = (f"input device {self.device.name!r} stopped delivering "
                                      f"audio after {self.samples / self.sample_rate:.1f} s")
                        return
                    continue
                last_audio = time.monotonic()
                if limit is not None:
                    block = block[: limit - self.samples]
                self.samples += len(block)
                yield block
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.stop()
            self._stream.close()
        except self._sd.PortAudioError as e:
            self.error = self.error or f"input device {self.device.name!r} failed: {_first_line(e)}"

    def __enter__(self) -> Microphone:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def microphone_chunks(device: int | str | None = None, sample_rate: int = SAMPLE_RATE,
                      chunk_ms: int = 100, max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks from an input device. The device may capture at another rate than
    `sample_rate` (its default); use `Microphone` directly to learn the rate."""
    yield from Microphone(device, sample_rate, chunk_ms).chunks(max_seconds)
