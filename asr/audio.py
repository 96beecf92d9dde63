"""Audio input: one contract for every stage.

`load_audio(path)` always returns mono float32 samples at SAMPLE_RATE, in [-1, 1] for well-formed input.
Decoding is libsndfile (via soundfile: WAV, FLAC, Ogg Vorbis/Opus, MP3 and more), block by block so
an hour-long file never sits in memory at its original rate and channel count; file input is resampled
with soxr's streaming resampler (the one live input uses), `resample()` is torchaudio's band-limited
sinc resampler for in-memory signals. Never naive interpolation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import torch

from .paths import readable_file

SAMPLE_RATE = 16000  # Hz, the rate every model in this project consumes
WIN_LENGTH = 400  # samples = 25 ms analysis window
N_FFT = 400  # samples, FFT size (= window; 201 frequency bins)
HOP_LENGTH = 160  # samples = 10 ms between feature frames
MIN_DURATION_S = 0.05  # shorter input cannot yield a single model output frame
AUDIO_EXTENSIONS = (".flac", ".wav", ".opus", ".ogg", ".mp3")


def exact_div(x: int, y: int) -> int:
    """Integer division that must be exact (a unit mistake otherwise goes unnoticed)."""
    assert x % y == 0, f"{x} is not a multiple of {y}"
    return x // y


FRAMES_PER_SECOND = exact_div(SAMPLE_RATE, HOP_LENGTH)  # 100 feature frames per second


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file and the problem."""


def resample(wave: np.ndarray, orig_sr: int, new_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono float32 samples (torchaudio sinc interpolation)."""
    if orig_sr == new_sr:
        return wave.astype(np.float32, copy=False)
    import torchaudio.functional as AF

    g = math.gcd(int(orig_sr), int(new_sr))
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
                      int(orig_sr) // g, int(new_sr) // g)
    return out.numpy()


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) -> (N,) contiguous float32, channels averaged."""
    if samples.ndim == 2:
        samples = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32)


READ_BLOCK_FRAMES = 1 << 18  # input frames decoded at a time (5.5 s at 48 kHz): bounds memory


def iter_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Decode a file block by block as mono float32 at `sample_rate`, in memory independent of its length.

    The blocks join into exactly what `load_audio` returns. Problems found before the first block
    (missing, unreadable, empty, too short) raise before anything is yielded; damage later in the
    file (a decode error, NaN samples) raises AudioError when the decoder reaches it.
    """
    p = readable_file(path, "audio file", AudioError)
    try:
        f = sf.SoundFile(os.fsencode(p))  # bytes: any file name the OS allows, UTF-8 or not
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{p}: cannot decode audio ({_short(e)})") from None
    with f:
        file_sr = f.samplerate
        resampler = None
        if file_sr != sample_rate:  # streaming resampler: same output as resampling the whole file
            import soxr

            resampler = soxr.ResampleStream(file_sr, sample_rate, 1, dtype="float32")
        n_read = 0
        while True:
            try:
                block = f.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                where = f" after {n_read / file_sr:.2f} s" if n_read else ""
                raise AudioError(f"{p}: cannot decode audio{where} (truncated or corrupt data: "
                                 f"{_short(e)})") from None
            if n_read == 0 and block.shape[0] < READ_BLOCK_FRAMES:  # the whole file is in this block
                if block.shape[0] == 0:
                    raise AudioError(f"{p}: contains no audio samples")
                if block.shape[0] / file_sr < MIN_DURATION_S:
                    raise AudioError(
                        f"{p}: too short ({1000 * block.shape[0] / file_sr:.0f} ms; need at least "
                        f"{1000 * MIN_DURATION_S:.0f} ms)")
            if block.shape[0] == 0:
                break
            mono = to_mono(block)
            if not np.isfinite(mono).all():
                at = (n_read + int(np.argmin(np.isfinite(mono)))) / file_sr
                raise AudioError(f"{p}: contains NaN or infinite samples (first at {at:.2f} s)")
            n_read += block.shape[0]
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=False)
            if mono.shape[0]:
                yield mono
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if tail.shape[0]:
                yield tail


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read any common audio file as mono float32 at `sample_rate`.

    Args:
        path: WAV (8/16/24/32-bit int, 32/64-bit float), FLAC, Ogg Vorbis/Opus or MP3 file.
        sample_rate: output rate in Hz.
    Returns:
        (N,) float32 samples.
    Raises:
        AudioError: missing, unreadable, empty, too short, or non-finite audio; the message names the file.
    """
    blocks = list(iter_audio(path, sample_rate))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding)."""
    try:
        info = sf.info(os.fsencode(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: cannot read audio header ({_short(e)})") from None
    return info.frames / info.samplerate


def iter_chunks(wave: np.ndarray, chunk_samples: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of `chunk_samples` (the last may be shorter)."""
    for start in range(0, len(wave), chunk_samples):
        yield wave[start:start + chunk_samples]


def _short(e: Exception) -> str:
    """libsndfile's reason without its prefixes ("Error opening 'x.wav': ", "Error : ")."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^Error opening .*?: (?=\S)", "", msg)
    return re.sub(r"^Error\s*:\s*", "", msg).strip() or type(e).__name__
