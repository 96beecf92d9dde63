"""Log-mel front end: chunk-exact streaming, frame count, global normalisation, on real speech."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from asr.audio import HOP_LENGTH, N_FFT, load_audio
from asr.features import (
    FeatureConfig,
    FeatureStats,
    OnlineLogMel,
    StatsAccumulator,
    log_mel,
)

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1.3 s of real speech (an odd length: the last frame needs the right padding)."""
    return load_audio(SAMPLES / "9300-1-0088.flac")[: 20_837]


def stream(wave: np.ndarray, cuts: list[int], stats: FeatureStats | None = None) -> torch.Tensor:
    """Features of `wave` fed to OnlineLogMel in pieces split at `cuts`."""
    fe = OnlineLogMel(CFG, stats)
    bounds = [0, *cuts, len(wave)]
    out = [fe.accept(wave[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    out.append(fe.finish())
    return torch.cat(out)


@pytest.mark.parametrize("chunk", [1, 159, 160, 4000])
def test_streaming_equals_offline_for_fixed_chunks(speech, chunk):
    wave = speech if chunk > 1 else speech[:4000]  # one sample at a time: keep it short
    cuts = list(range(chunk, len(wave), chunk))
    np.testing.assert_allclose(stream(wave, cuts).numpy(), log_mel(wave, CFG).numpy(), atol=1e-5)


def test_streaming_equals_offline_for_random_splits(speech):
    rng = np.random.default_rng(0)
    offline = log_mel(speech, CFG).numpy()
    for _ in range(3):
        cuts = sorted(rng.choice(np.arange(1, len(speech)), size=rng.integers(1, 40), replace=False))
        np.testing.assert_allclose(stream(speech, list(cuts)).numpy(), offline, atol=1e-5)


def test_frames_become_available_as_soon_as_their_samples_arrive(speech):
    fe = OnlineLogMel(CFG)
    got = fe.accept(speech[: N_FFT - 1])
    assert got.shape[0] == 0  # the first window is not complete yet
    got = fe.accept(speech[N_FFT - 1: N_FFT])
    assert got.shape[0] == 1
    got = fe.accept(speech[N_FFT: N_FFT + 3 * HOP_LENGTH])
    assert got.shape[0] == 3
    assert fe.accept(np.zeros(0, np.float32)).shape[0] == 0


@pytest.mark.parametrize("n", [0, 1, 159, 160, 161, 399, 400, 401, 16_000, 20_837])
def test_frame_count_is_samples_over_hop(speech, n):
    feats = log_mel(speech[:n], CFG)
    assert feats.shape == (n // HOP_LENGTH, CFG.n_mels)
    assert stream(speech[:n], [n // 3] if n > 2 else []).shape == feats.shape


def test_features_are_causal(speech):
    """Frame i depends only on samples before (i * hop + n_fft): appending audio changes no old frame."""
    a = log_mel(speech[:8000], CFG)
    b = log_mel(speech, CFG)
    complete = (8000 - N_FFT) // HOP_LENGTH + 1  # frames that did not need the zero padding
    np.testing.assert_allclose(a[:complete].numpy(), b[:complete].numpy(), atol=1e-5)


def test_log_mel_of_speech_is_finite_and_loud_frames_are_louder(speech):
    feats = log_mel(speech, CFG)
    assert torch.isfinite(feats).all()
    silence = log_mel(np.zeros(16000, np.float32), CFG)
    # the loudest speech frames sit far above digital silence (log(LOG_FLOOR) in every bin)
    assert feats.mean(1).max() > silence.mean() + 5


def test_normalisation_uses_the_given_global_stats(speech):
    acc = StatsAccumulator(CFG.n_mels)
    for stem in ("9300-1-0088", "9300-1-0093", "9302-1-0000"):
        acc.add(log_mel(load_audio(SAMPLES / f"{stem}.flac"), CFG))
    stats = acc.stats()
    feats = torch.cat([log_mel(load_audio(SAMPLES / f"{s}.flac"), CFG)
                       for s in ("9300-1-0088", "9300-1-0093", "9302-1-0000")])
    norm = stats.normalize(feats)
    np.testing.assert_allclose(norm.mean(0).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(norm.std(0, unbiased=False).numpy(), 1, atol=1e-3)
    # the streaming featurizer applies the same stats, frame for frame (no per-utterance stats)
    np.testing.assert_allclose(stream(speech, [777, 5000], stats).numpy(),
                               stats.normalize(log_mel(speech, CFG)).numpy(), atol=1e-4)


def test_stats_round_trip_through_a_dict():
    stats = FeatureStats(mean=torch.linspace(-9, -2, 80), std=torch.linspace(1, 4, 80))
    back = FeatureStats.from_dict(stats.to_dict())
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)


def test_reset_starts_a_new_utterance(speech):
    fe = OnlineLogMel(CFG)
    fe.accept(speech[:5000])
    fe.reset()
    again = torch.cat([fe.accept(speech[:9000]), fe.finish()])
    np.testing.assert_allclose(again.numpy(), log_mel(speech[:9000], CFG).numpy(), atol=1e-5)


def test_absurd_but_finite_amplitudes_give_finite_features():
    x = np.full(4000, 3e38, np.float32)
    x[::2] = -3e38
    assert torch.isfinite(log_mel(x, CFG)).all()
