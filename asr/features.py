"""Log-mel front end, identical offline and chunk by chunk.

Frame `i` covers samples `[i * hop, i * hop + n_fft)` (no centre padding). An utterance of N samples
gives `N // hop` frames: the waveform is right-padded with `n_fft - hop` zeros, so every 10 ms of audio
owns exactly one frame. `OnlineLogMel` emits each frame as soon as its samples have arrived and applies
the same right padding in `finish()`, so any chunking reproduces `log_mel()`. Normalisation uses global
statistics (`FeatureStats`, stored in the checkpoint); a model trained with `cmn_window` then also
subtracts a causal running mean (`subtract_running_mean`), computed frame by frame from the start of
the stream, so it too is the same over a whole file and chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, WIN_LENGTH

LOG_FLOOR = 1e-6  # added to mel power before the log: bounds digital silence at log(1e-6) ~ -13.8
MAX_AMPLITUDE = 1000.0  # samples are clipped to +-this (60 dB over full scale): features stay finite


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = SAMPLE_RATE  # Hz of the input samples
    n_fft: int = N_FFT  # samples per FFT (and per frame)
    win_length: int = WIN_LENGTH  # samples in the Hann window (25 ms)
    hop_length: int = HOP_LENGTH  # samples between frames (10 ms)
    n_mels: int = 80  # mel bins F
    f_min: float = 20.0  # Hz, lowest mel edge
    f_max: float = 7600.0  # Hz, highest mel edge (below Nyquist; codecs cut the top band)
    # causal mean normalisation after the global statistics (0: off): the running mean of the
    # normalised frames, starting from the global mean as if it were `cmn_prior` frames, becomes an
    # exponential average over `cmn_window` frames once that many have been seen
    cmn_window: int = 0
    cmn_prior: int = 100
    # with cmn_window: only frames louder (mean over bins) than a tracked noise floor by more than
    # this update the running mean, so pauses, silence and steady noise leave it alone (0: every
    # frame updates it); the floor follows every dip at once and rises at most cmn_floor_rise a frame
    cmn_floor_gate: float = 0.0
    cmn_floor_rise: float = 0.002

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        for name in ("f_min", "f_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min {self.f_min}, "
                             f"f_max {self.f_max}, sample_rate {self.sample_rate}")
        for name in ("cmn_window", "cmn_prior"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("cmn_floor_gate", "cmn_floor_rise"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=8)
def _mel_transform(cfg: FeatureConfig):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
        hop_length=cfg.hop_length, f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels,
        center=False, power=2.0, norm="slaney", mel_scale="slaney")


def warped_mel_fbank(cfg: FeatureConfig, alpha: float, boundary_hz: float = 4800.0) -> Tensor:
    """The mel filterbank under vocal tract length perturbation (VTLP), (n_fft // 2 + 1, F).

    Frequency f of the input spectrum is read as warp(f): alpha * f up to a boundary, then the straight
    line that keeps Nyquist at Nyquist (Jaitly & Hinton 2013). alpha > 1 moves the formants up, as a
    shorter vocal tract would. Each filter is the unwarped triangle, interpolated at warp(f).
    """
    fb = _mel_transform(cfg).mel_scale.fb  # (n_freqs, F), sampled at linspace(0, nyquist, n_freqs)
    n_freqs = fb.shape[0]
    nyquist = cfg.sample_rate / 2
    freqs = torch.linspace(0, nyquist, n_freqs, dtype=torch.float64)
    knee = boundary_hz * min(alpha, 1.0) / alpha
    upper = nyquist - (nyquist - boundary_hz * min(alpha, 1.0)) / (nyquist - knee) * (nyquist - freqs)
    warped = torch.where(freqs <= knee, alpha * freqs, upper).clamp(0, nyquist)
    pos = warped / nyquist * (n_freqs - 1)  # fractional index into the unwarped grid
    lo = pos.floor().long().clamp(max=n_freqs - 2)
    frac = (pos - lo).float().unsqueeze(1)
    return fb[lo] * (1 - frac) + fb[lo + 1] * frac


def _frames(wave: Tensor, cfg: FeatureConfig, fbank: Tensor | None = None) -> Tensor:
    """Log-mel of every complete frame in `wave`: (N,) -> (T, F), T = 1 + (N - n_fft) // hop."""
    if wave.shape[0] < cfg.n_fft:
        return torch.zeros(0, cfg.n_mels)
    transform = _mel_transform(cfg)
    with torch.no_grad():
        wave = wave.clamp(-MAX_AMPLITUDE, MAX_AMPLITUDE)
        if fbank is None:
            mel = transform(wave)  # (F, T)
        else:
            mel = fbank.T @ transform.spectrogram(wave)
    return torch.log(mel + LOG_FLOOR).T.contiguous()


def log_mel(wave: np.ndarray | Tensor, cfg: FeatureConfig = FeatureConfig(), vtlp: float = 1.0) -> Tensor:
    """Un-normalised log-mel features of a whole utterance.

    Args:
        wave: (N,) float32 samples at cfg.sample_rate.
        vtlp: frequency warp factor for training augmentation (`warped_mel_fbank`); 1.0 = none.
    Returns:
        (N // hop, F) float32.
    """
    w = torch.as_tensor(wave, dtype=torch.float32)
    assert w.ndim == 1, f"expected mono (N,) samples, got {tuple(w.shape)}"
    n_frames = w.shape[0] // cfg.hop_length
    padded = torch.nn.functional.pad(w, (0, cfg.n_fft - cfg.hop_length))
    feats = _frames(padded, cfg, None if vtlp == 1.0 else warped_mel_fbank(cfg, vtlp))
    assert feats.shape[0] == n_frames
    return feats


@dataclass
class FeatureStats:
    """Global per-bin mean and standard deviation of log-mel features over a training corpus."""

    mean: Tensor  # (F,)
    std: Tensor  # (F,)

    def normalize(self, feats: Tensor) -> Tensor:
        """(..., F) -> (..., F), zero mean and unit variance per bin over the training data."""
        return (feats - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"mean": self.mean.float().clone(), "std": self.std.float().clone()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureStats:
        return cls(mean=d["mean"].float(), std=d["std"].float())

    @classmethod
    def identity(cls, n_mels: int) -> FeatureStats:
        return cls(mean=torch.zeros(n_mels), std=torch.ones(n_mels))


@dataclass
class RunningMean:
    """Streaming state of `subtract_running_mean`: the mean so far, its frame count and the noise
    floor (with `cmn_floor_gate`)."""

    mean: np.ndarray  # (F,) float32
    count: int
    floor: float | None = None  # frame energy floor; None before the first frame


def subtract_running_mean(feats: Tensor, cfg: FeatureConfig,
                          state: RunningMean | None = None) -> tuple[Tensor, RunningMean]:
    """Causal mean normalisation of globally normalised frames, (T, F) -> (T, F) and the new state.

    Frame t is reduced by m_t = m_{t-1} + (x_t - m_{t-1}) / n_t with n_t = min(n_{t-1} + 1, cmn_window),
    m = 0 and n = cmn_prior before the first frame. The frames are taken one by one, so the result
    does not depend on how a stream is split into calls. A speaker's or a microphone's constant offset
    in log-mel space (level, channel colouring) fades out within about a second. With
    `cmn_floor_gate` g > 0, frame t updates m and n only if its energy e_t (mean over bins) exceeds
    the floor f_t = min(e_t, f_{t-1} + cmn_floor_rise) by more than g (f = e at the first frame).
    """
    if state is None:
        state = RunningMean(np.zeros(cfg.n_mels, dtype=np.float32), cfg.cmn_prior)
    x = feats.detach().to(torch.float32).numpy()
    out = np.empty_like(x)
    mean, count, floor = state.mean.copy(), state.count, state.floor
    gate, rise = cfg.cmn_floor_gate, cfg.cmn_floor_rise
    for t in range(x.shape[0]):
        if gate:
            e = float(x[t].mean())
            floor = e if floor is None else min(e, floor + rise)
            if e <= floor + gate:
                out[t] = x[t] - mean
                continue
        count = min(count + 1, cfg.cmn_window)
        mean += (x[t] - mean) / np.float32(count)
        out[t] = x[t] - mean
    return torch.from_numpy(out), RunningMean(mean, count, floor)


def normalize_features(feats: Tensor, cfg: FeatureConfig, stats: FeatureStats | None) -> Tensor:
    """A whole utterance's log-mel frames as the model takes them: global statistics, then the
    causal running mean when `cfg.cmn_window` is set. `OnlineLogMel` gives the same chunk by chunk."""
    if stats is not None:
        feats = stats.normalize(feats)
        if cfg.cmn_window:
            feats = subtract_running_mean(feats, cfg)[0]
    return feats


class StatsAccumulator:
    """Running sum and sum of squares (float64) for FeatureStats."""

    def __init__(self, n_mels: int):
        self.n = 0
        self.s = torch.zeros(n_mels, dtype=torch.float64)
        self.s2 = torch.zeros(n_mels, dtype=torch.float64)

    def add(self, feats: Tensor) -> None:
        f = feats.double()
        self.n += f.shape[0]
        self.s += f.sum(0)
        self.s2 += (f * f).sum(0)

    def stats(self) -> FeatureStats:
        assert self.n > 0, "no frames accumulated"
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(1e-8)
        return FeatureStats(mean=mean.float(), std=var.sqrt().float())


class OnlineLogMel:
    """Streaming log-mel: accepts samples in chunks of any size and emits normalised frames.

    State: the unconsumed sample tail (shorter than n_fft), the number of samples seen and, with
    `cmn_window`, the running mean (`restart_mean()` starts it afresh when the speaker may change).
    """

    def __init__(self, cfg: FeatureConfig, stats: FeatureStats | None = None):
        self.cfg = cfg
        self.stats = stats
        self.reset()

    def reset(self) -> None:
        self._buffer = torch.zeros(0)  # samples from the next frame's start onwards
        self._n_samples = 0  # samples accepted so far
        self._n_frames = 0  # frames emitted so far
        self._mean: RunningMean | None = None  # running-mean state (cmn_window models)

    @property
    def running_mean(self) -> RunningMean | None:
        """The running mean's state (None without `cmn_window` or before the first frame)."""
        return self._mean

    def restart_mean(self) -> None:
        """Start the running mean (and its noise floor) afresh, as at the start of a stream, while
        the sample stream itself goes on: for a new speaker, whose level and colouring the old
        mean would otherwise carry over for about its window. No effect without `cmn_window`."""
        self._mean = None

    def _out(self, feats: Tensor) -> Tensor:
        self._n_frames += feats.shape[0]
        if self.stats is not None:
            feats = self.stats.normalize(feats)
            if self.cfg.cmn_window and feats.shape[0]:
                feats, self._mean = subtract_running_mean(feats, self.cfg, self._mean)
        return feats

    def accept(self, samples: np.ndarray | Tensor) -> Tensor:
        """Add samples; returns the newly complete frames, (T_new, F) with T_new possibly 0."""
        x = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
        self._n_samples += x.shape[0]
        self._buffer = torch.cat([self._buffer, x])
        feats = _frames(self._buffer, self.cfg)
        self._buffer = self._buffer[feats.shape[0] * self.cfg.hop_length:]
        return self._out(feats)

    def finish(self) -> Tensor:
        """Flush with the same right padding as log_mel(); returns the remaining frames."""
        total = self._n_samples // self.cfg.hop_length
        padded = torch.nn.functional.pad(self._buffer, (0, self.cfg.n_fft - self.cfg.hop_length))
        feats = _frames(padded, self.cfg)[: total - self._n_frames]
        out = self._out(feats)
        self._buffer = torch.zeros(0)
        return out
