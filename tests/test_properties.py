"""Property tests (hypothesis): invariants that must hold for any input, not just the examples."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from asr.decoding import GreedyCTCStream, greedy_decode
from asr.features import FeatureConfig, OnlineLogMel, log_mel
from asr.text import Vocab, normalize_text
from asr.transcribe import iter_windows, split_at_pauses

CFG = FeatureConfig()
V = len(Vocab())
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text())
def test_normalize_text_is_idempotent(s):
    once = normalize_text(s)
    assert normalize_text(once) == once


@SETTINGS
@given(st.text(alphabet=st.sampled_from("aBc' -\u2019.,!\u00e9\t\n")))
def test_normalized_text_has_single_spaces_and_no_edge_apostrophes(s):
    out = normalize_text(s)
    assert out == out.strip() and "  " not in out
    for word in out.split():
        assert not word.startswith("'") and not word.endswith("'")
        assert word == word.lower()


def reference_collapse(path: list[int], blank: int = 0) -> list[tuple[int, int, int]]:
    """(token, start, end) of each run of a non-blank token: the CTC best-path collapse by definition."""
    runs, t = [], 0
    for tok, group in itertools.groupby(path):
        n = len(list(group))
        if tok != blank:
            runs.append((tok, t, t + n))
        t += n
    return runs


def one_hot_log_probs(path: list[int]) -> torch.Tensor:
    lp = torch.full((len(path), V), -10.0)
    lp[torch.arange(len(path)), torch.tensor(path, dtype=torch.long)] = -0.01
    return lp


@SETTINGS
@given(st.lists(st.integers(0, V - 1), max_size=200), st.data())
def test_ctc_greedy_decoding_of_any_path_collapses_correctly(path, data):
    expected = reference_collapse(path)
    lp = one_hot_log_probs(path) if path else torch.zeros(0, V)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(path)), max_size=6)))
    stream = GreedyCTCStream()
    for a, b in zip([0, *cuts], [*cuts, len(path)], strict=True):
        stream.push(lp[a:b])
    assert [(e.token, e.start, e.end) for e in stream.emissions] == expected
    if path:
        assert greedy_decode(lp[None], torch.tensor([len(path)]))[0] == [t for t, _, _ in expected]


finite_waves = arrays(np.float32, st.integers(0, 2400),
                      elements=st.floats(allow_nan=False, allow_infinity=False, width=32))


@SETTINGS
@given(finite_waves)
def test_features_are_finite_for_any_finite_input(wave):
    feats = log_mel(wave, CFG)
    assert feats.shape == (len(wave) // CFG.hop_length, CFG.n_mels)
    assert torch.isfinite(feats).all()


audio_like = arrays(np.float32, st.integers(0, 2400),
                    elements=st.floats(-1, 1, allow_nan=False, width=32))


@SETTINGS
@given(audio_like, st.data())
def test_streaming_features_equal_offline_for_any_chunking(wave, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wave)), max_size=8)))
    fe = OnlineLogMel(CFG)
    parts = [fe.accept(wave[a:b]) for a, b in zip([0, *cuts], [*cuts, len(wave)], strict=True)]
    parts.append(fe.finish())
    np.testing.assert_allclose(torch.cat(parts).numpy(), log_mel(wave, CFG).numpy(), atol=1e-5)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 6000), st.integers(0, 12_000))
def test_pause_cuts_do_not_depend_on_how_the_audio_is_blocked(seed, block, n_extra):
    """Bounded-memory transcription cuts long audio exactly where the whole-signal cut would be."""
    rng = np.random.default_rng(seed)
    sr = 1600  # a low rate keeps the example small; 100 energy frames per second as always
    n = 2 * sr + n_extra
    envelope = np.repeat(rng.uniform(0, 1, n // 40 + 1), 40)[:n]  # 25 ms loudness steps
    wave = (rng.normal(0, 1, n) * envelope).astype(np.float32)
    whole = split_at_pauses(wave, max_window_s=0.5, sample_rate=sr)
    blocks = (wave[i:i + block] for i in range(0, n, block))
    blocked = [(a, a + len(p)) for a, p in iter_windows(blocks, max_window_s=0.5, sample_rate=sr)]
    assert blocked == whole
    assert whole[0][0] == 0 and whole[-1][1] == n
    assert all(b - a <= sr // 2 for a, b in whole)
    assert all(w1[1] == w2[0] for w1, w2 in zip(whole, whole[1:], strict=False))
