"""load_audio: every common format, rate and channel count arrives as mono float32 at 16 kHz.

Each file is a synthetic tone written with soundfile in tmp_path, so the expected output is known
analytically: a correct band-limited resampler reproduces sin(2 pi f t) at the output instants.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLES

from asr.audio import (
    MIN_DURATION_S,
    READ_BLOCK_FRAMES,
    SAMPLE_RATE,
    AudioError,
    iter_audio,
    load_audio,
    resample,
)

TONE_HZ = 1000.0  # below the Nyquist frequency of every rate tested (8 kHz input -> 4 kHz)
AMP = 0.5
RATES = (8000, 22050, 44100, 48000, 96000)
HAS_MP3 = "MP3" in sf.available_formats()

# (format, subtype, extension, max abs error against the analytic tone, rates the codec accepts)
LOSSLESS = [
    ("WAV", "PCM_U8", "wav", 1e-2, RATES),  # 8-bit: quantisation step 1/128
    ("WAV", "PCM_16", "wav", 1e-4, RATES),
    ("WAV", "PCM_24", "wav", 1e-5, RATES),
    ("WAV", "PCM_32", "wav", 1e-5, RATES),
    ("WAV", "FLOAT", "wav", 1e-5, RATES),
    ("WAV", "DOUBLE", "wav", 1e-5, RATES),
    ("FLAC", "PCM_16", "flac", 1e-4, RATES),
    ("FLAC", "PCM_24", "flac", 1e-5, (44100, 96000)),
]
LOSSY = [
    ("OGG", "VORBIS", "ogg", RATES),
    ("OGG", "OPUS", "opus", (8000, 48000)),  # Opus accepts 8/12/16/24/48 kHz only
    ("MP3", "MPEG_LAYER_III", "mp3", (8000, 22050, 44100, 48000)),  # MPEG audio stops at 48 kHz
]


def tone(rate: int, seconds: float = 0.5, freq: float = TONE_HZ, amp: float = AMP) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def peak_hz(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spec)) * rate / len(wave)


def expected_length(n_in: int, rate: int) -> int:
    return round(n_in * SAMPLE_RATE / rate)


def interior(x: np.ndarray, margin: int = 160) -> np.ndarray:
    """Drop 10 ms at each end, where any resampler sees the file's edges."""
    return x[margin:-margin]


def write_tone_and_load(tmp_path, fmt: str, subtype: str, ext: str, rate: int) -> np.ndarray:
    """Write the test tone at `rate` in a format, load it back: mono float32 of the resampled length."""
    path = tmp_path / f"tone.{ext}"
    x = tone(rate)
    sf.write(path, x, rate, format=fmt, subtype=subtype)
    w = load_audio(path)
    assert w.dtype == np.float32 and w.ndim == 1
    assert len(w) == expected_length(len(x), rate)
    return w


@pytest.mark.parametrize("fmt,subtype,ext,tol,rate", [
    pytest.param(f, s, e, t, r, id=f"{s}-{r}") for f, s, e, t, rates in LOSSLESS for r in rates])
def test_lossless_formats_resample_to_the_exact_tone(tmp_path, fmt, subtype, ext, tol, rate):
    w = write_tone_and_load(tmp_path, fmt, subtype, ext, rate)
    t = np.arange(len(w)) / SAMPLE_RATE
    err = np.abs(interior(w) - interior(AMP * np.sin(2 * np.pi * TONE_HZ * t))).max()
    assert err < tol, f"max error {err:.2e} against the analytic tone"


@pytest.mark.parametrize("fmt,subtype,ext,rate", [
    pytest.param(f, s, e, r, id=f"{s}-{r}") for f, s, e, rates in LOSSY for r in rates])
def test_lossy_formats_keep_length_pitch_and_level(tmp_path, fmt, subtype, ext, rate):
    if fmt == "MP3" and not HAS_MP3:
        pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
    w = write_tone_and_load(tmp_path, fmt, subtype, ext, rate)
    assert abs(peak_hz(w) - TONE_HZ) <= SAMPLE_RATE / len(w)  # within one FFT bin
    rms = np.sqrt(np.mean(interior(w, 800) ** 2))
    assert rms == pytest.approx(AMP / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("ext,rate", [("wav", 44100), ("flac", 48000), ("wav", 16000)])
def test_channels_are_averaged(tmp_path, channels, ext, rate):
    # a different tone in every channel: the mono mix holds each at 1/channels of its level
    freqs = [500.0 * (c + 1) for c in range(channels)]
    x = np.stack([tone(rate, freq=f) for f in freqs], axis=1)
    path = tmp_path / f"multi.{ext}"
    sf.write(path, x, rate, subtype="PCM_24")
    w = load_audio(path)
    assert len(w) == expected_length(len(x), rate)
    t = np.arange(len(w)) / SAMPLE_RATE
    mix = sum(AMP * np.sin(2 * np.pi * f * t) for f in freqs) / channels
    assert np.abs(interior(w) - interior(mix)).max() < 1e-4


def test_resampling_removes_content_above_the_new_nyquist(tmp_path):
    """A 10 kHz tone cannot exist at 16 kHz; naive decimation would fold it down to 6 kHz."""
    path = tmp_path / "high.wav"
    sf.write(path, tone(44100, freq=10_000.0), 44100, subtype="FLOAT")
    w = load_audio(path)
    assert np.sqrt(np.mean(interior(w, 800) ** 2)) < 1e-3 * AMP


def test_in_memory_resample_is_band_limited_too():
    """`resample` (used for speed perturbation) keeps a 1 kHz tone and its length."""
    x = tone(22050, seconds=1.0).astype(np.float32)
    w = resample(x, 22050, SAMPLE_RATE)
    assert len(w) == SAMPLE_RATE
    t = np.arange(len(w)) / SAMPLE_RATE
    assert np.abs(interior(w) - interior(AMP * np.sin(2 * np.pi * TONE_HZ * t))).max() < 1e-3


def test_long_file_is_decoded_in_blocks_without_seams(tmp_path):
    """Three read blocks at 48 kHz: block joins and the streaming resampler leave no trace."""
    rate = 48000
    seconds = 2.5 * READ_BLOCK_FRAMES / rate
    x = tone(rate, seconds=seconds)
    path = tmp_path / "long.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    blocks = list(iter_audio(path))
    assert len(blocks) >= 3
    w = load_audio(path)
    np.testing.assert_array_equal(np.concatenate(blocks), w)
    assert len(w) == expected_length(len(x), rate)
    t = np.arange(len(w)) / SAMPLE_RATE
    assert np.abs(interior(w) - interior(AMP * np.sin(2 * np.pi * TONE_HZ * t))).max() < 1e-5


def test_16k_real_speech_is_returned_unchanged():
    """The training path: a 16 kHz FLAC comes back sample for sample as soundfile reads it."""
    path = SAMPLES / "9300-1-0088.flac"
    ref, sr = sf.read(path, dtype="float32")
    assert sr == SAMPLE_RATE
    np.testing.assert_array_equal(load_audio(path), ref)


def test_float_file_beyond_full_scale_is_passed_through(tmp_path):
    path = tmp_path / "hot.wav"
    sf.write(path, 3.0 * tone(16000), 16000, subtype="FLOAT")
    assert np.abs(load_audio(path)).max() == pytest.approx(1.5, rel=1e-3)


def _write_bad(tmp_path, kind):
    p = tmp_path / f"bad {kind}.wav"
    if kind == "empty":
        p.touch()
    elif kind == "no-samples":
        sf.write(p, np.zeros(0), 16000)
    elif kind == "too-short":
        sf.write(p, tone(16000, seconds=0.01), 16000)
    elif kind == "text":
        p.write_text("this is not audio\n" * 20)
    elif kind == "nan":
        x = tone(16000)
        x[4000] = np.nan
        sf.write(p, x, 16000, subtype="FLOAT")
    elif kind == "inf":
        x = tone(16000)
        x[4000] = -np.inf
        sf.write(p, x, 16000, subtype="DOUBLE")
    elif kind == "directory":
        p.mkdir()
    return p


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such audio file"),
    ("empty", "file is empty"),
    ("no-samples", "no audio samples"),
    ("too-short", "too short (10 ms"),
    ("text", "cannot decode audio"),
    ("nan", "NaN or infinite samples (first at 0.25 s)"),
    ("inf", "NaN or infinite samples (first at 0.25 s)"),
    ("directory", "is a directory"),
])
def test_unusable_input_raises_audio_error_naming_the_file(tmp_path, kind, reason):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(AudioError) as e:
        load_audio(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert reason in msg
    assert "\n" not in msg


def test_the_shortest_accepted_input(tmp_path):
    path = tmp_path / "short.wav"
    n = int(MIN_DURATION_S * 44100) + 1
    sf.write(path, tone(44100)[:n], 44100)
    assert len(load_audio(path)) == expected_length(n, 44100)
