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
    normalize_features,
    subtract_running_mean,
)

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1.3 s of real speech (an odd length: the last frame needs the right padding)."""
    return load_audio(SAMPLES / "9300-1-0088.flac")[: 20_837]


def stream(wave: np.ndarray, cuts: list[int], stats: FeatureStats | None = None,
           cfg: FeatureConfig = CFG) -> torch.Tensor:
    """Features of `wave` fed to OnlineLogMel in pieces split at `cuts`."""
    fe = OnlineLogMel(cfg, stats)
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


# ----------------------------------------------------------------------------- running mean (CMN)

CMN = FeatureConfig(cmn_window=300, cmn_prior=100)


@pytest.fixture(scope="module")
def sentences() -> tuple[np.ndarray, FeatureStats]:
    """Three real sentences back to back (about 10 s) and global stats from them."""
    wave = np.concatenate([load_audio(SAMPLES / f"{s}.flac") for s in ("9300-1-0088", "9300-1-0093",
                                                                       "9302-1-0000")])
    acc = StatsAccumulator(CFG.n_mels)
    acc.add(log_mel(wave, CFG))
    return wave, acc.stats()


GATED = FeatureConfig(cmn_window=300, cmn_prior=100, cmn_floor_gate=0.5)


@pytest.mark.parametrize("cfg", [CMN, GATED], ids=["cmn", "cmn-floor-gate"])
def test_running_mean_streams_exactly_like_the_whole_file(sentences, cfg):
    """With cmn_window (and its noise-floor gate) the streaming featurizer still reproduces the
    whole-file features for any chunking: the running mean is carried across chunks, not restarted."""
    wave, stats = sentences
    offline = normalize_features(log_mel(wave, cfg), cfg, stats).numpy()
    assert not np.allclose(offline, stats.normalize(log_mel(wave, cfg)).numpy(), atol=0.05)  # it acts
    rng = np.random.default_rng(1)
    for _ in range(3):
        cuts = sorted(rng.choice(np.arange(1, len(wave)), size=rng.integers(1, 60), replace=False))
        np.testing.assert_allclose(stream(wave, list(cuts), stats, cfg).numpy(), offline, atol=1e-4)
    # the state alone carries it: two calls give exactly one call's result
    x = stats.normalize(log_mel(wave, cfg))
    whole, end = subtract_running_mean(x, cfg)
    first, mid = subtract_running_mean(x[:333], cfg)
    second, end2 = subtract_running_mean(x[333:], cfg, mid)
    assert torch.equal(torch.cat([first, second]), whole)
    assert end2.count == end.count and np.array_equal(end2.mean, end.mean) and end2.floor == end.floor


@pytest.mark.parametrize("lead", ["digital silence", "noise"])
def test_floor_gate_keeps_pauses_and_steady_noise_out_of_the_running_mean(sentences, lead):
    """15 s without speech before a sentence drags a plain running mean away from speech, so the
    sentence's features change; with the noise-floor gate the lead-in leaves the mean where it was
    and the sentence comes out much as it does alone."""
    wave, stats = sentences
    n = 15 * 16000
    pre = np.zeros(n, np.float32) if lead == "digital silence" else \
        (np.random.default_rng(0).standard_normal(n) * 10 ** (-55 / 20)).astype(np.float32)

    def shift(cfg: FeatureConfig) -> float:
        """Mean |difference| of the sentence's first 2 s of frames with and without the lead-in."""
        alone = normalize_features(log_mel(wave, cfg), cfg, stats)
        led = normalize_features(log_mel(np.concatenate([pre, wave]), cfg), cfg, stats)[n // 160:]
        return (led - alone)[:200].abs().mean().item()

    assert shift(CMN) > 0.4
    assert shift(GATED) < 0.1 * shift(CMN)


def test_running_mean_removes_a_change_of_recording_level(sentences):
    """A quieter recording (-12 dB) shifts the global-normalised frames of every mel bin; the running
    mean takes that shift out after the first second or two, as a new microphone or speaker level
    needs. (Frames of digital silence sit at the log floor at any level, so the shift is a per-bin
    average over frames, not a constant.)"""
    wave, stats = sentences

    def shift(cfg: FeatureConfig, frames: slice) -> float:
        """Mean over bins of |mean over frames of (loud - quiet)|."""
        loud = normalize_features(log_mel(wave, cfg), cfg, stats)
        quiet = normalize_features(log_mel(wave * 0.25, cfg), cfg, stats)
        return (loud - quiet)[frames].mean(0).abs().mean().item()

    later = slice(200, None)  # after 2 s
    assert shift(CFG, later) > 0.5
    assert shift(CMN, later) < 0.15 * shift(CFG, later)
    first = slice(0, 20)  # causal: the first frames cannot know the level yet
    assert shift(CMN, first) > 0.8 * shift(CFG, first)


def test_restart_mean_drops_the_previous_speakers_level(sentences):
    """After 18 s at one level, a recording 12 dB quieter (another speaker or microphone): with a
    10 s window the old level lingers in the new frames for seconds; restart_mean() at the change
    (what `--speaker-changes` does at each endpoint) starts the mean afresh, so what came before
    no longer shows, and the sample stream itself goes on (no frame lost or repeated)."""
    wave, stats = sentences
    cfg = FeatureConfig(cmn_window=1000, cmn_prior=100)

    def quiet_after(before: np.ndarray, restart: bool) -> torch.Tensor:
        fe = OnlineLogMel(cfg, stats)
        n = fe.accept(before).shape[0]
        assert fe.running_mean.count == cfg.cmn_window
        if restart:
            fe.restart_mean()
            assert fe.running_mean is None
        out = torch.cat([fe.accept(wave * 0.25), fe.finish()])
        assert n + out.shape[0] == (len(before) + len(wave)) // HOP_LENGTH
        return out

    def lingering(restart: bool) -> float:
        """How much the earlier level still shows in the new recording's frames 2-4 s in."""
        loud, quiet = np.tile(wave, 2), np.tile(wave, 2) * 0.25
        diff = quiet_after(loud, restart) - quiet_after(quiet, restart)
        return diff[200:400].mean(0).abs().mean().item()

    assert lingering(False) > 0.3
    assert lingering(True) < 0.05 * lingering(False)


def test_running_mean_is_off_by_default_and_needs_global_stats(speech, sentences):
    _, stats = sentences
    assert CFG.cmn_window == 0
    assert torch.equal(normalize_features(log_mel(speech, CFG), CFG, stats), stats.normalize(log_mel(speech, CFG)))
    # without stats (computing them) the raw log-mel is returned, running mean or not
    assert torch.equal(normalize_features(log_mel(speech, CMN), CMN, None), log_mel(speech, CMN))
