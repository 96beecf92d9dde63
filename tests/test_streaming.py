"""Streaming session: exactly offline decoding for any chunking, endpointing, reset, resampling,
and the shared live loop (Ctrl-C flushes)."""

from __future__ import annotations

import io
from dataclasses import replace

import jiwer
import numpy as np
import pytest
import torch
from conftest import SAMPLES, sample_reference

from asr.audio import load_audio, resample
from asr.checkpoint import load_model
from asr.decoding import GreedyCTCStream, emissions_to_words, greedy_decode
from asr.features import FeatureConfig
from asr.live import run_file_stream, run_stream
from asr.streaming import StreamingSession
from asr.text import Vocab
from asr.transcribe import decode_wave

RATE = 16000
STEMS = sorted(p.stem for p in SAMPLES.glob("*.flac"))
PAIR = ("9300-1-0088", "9302-1-0000")  # joined by a pause for the endpointing tests


def feed(session: StreamingSession, wave: np.ndarray, sizes) -> list:
    """Push `wave` in pieces of the given sizes (samples), then flush; all events."""
    events, pos = [], 0
    for n in sizes:
        if pos >= len(wave):
            break
        events += session.push(wave[pos:pos + n])
        pos += n
    assert pos >= len(wave)
    return events + session.flush()


def even(wave: np.ndarray, chunk_ms: float, rate: int = RATE) -> list[int]:
    n = max(1, round(rate * chunk_ms / 1000))
    return [n] * (len(wave) // n + 1)


def finals(events) -> list:
    return [e for e in events if e.kind == "final"]


def word_tuples(words) -> list[tuple]:
    return [(w.word, w.start, w.end) for w in words]


def assert_same_as_offline(lm, wave, events):
    """One final utterance whose text, word timings and confidences equal offline decoding."""
    words, text = decode_wave(lm, wave)
    (final,) = finals(events)
    assert final.text == text
    assert word_tuples(final.words) == word_tuples(words)
    assert [w.confidence for w in final.words] == pytest.approx([w.confidence for w in words],
                                                                abs=1e-4)
    partials = [e.text for e in events if e.kind == "partial"]
    assert all(text.startswith(p) for p in partials)  # partials only ever grow


@pytest.mark.parametrize("chunk_ms", [10, 40, 100, 1000, 2000])
def test_any_chunk_size_equals_offline(random_stream_model, chunk_ms):
    lm = random_stream_model
    for stem in STEMS:
        wave = load_audio(SAMPLES / f"{stem}.flac")
        session = StreamingSession(lm, endpoint_ms=None)
        events = feed(session, wave, even(wave, chunk_ms))
        assert_same_as_offline(lm, wave, events)
        assert session.seconds == pytest.approx(len(wave) / RATE)


@pytest.mark.parametrize("fcfg", [FeatureConfig(), FeatureConfig(cmn_window=300),
                                  FeatureConfig(cmn_window=300, cmn_floor_gate=0.5)],
                         ids=["global", "cmn", "cmn-floor-gate"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunkings_equal_offline(random_stream_model, seed, fcfg):
    """Any chunking gives the offline words, also with a running mean in the front end (cmn_window,
    optionally gated), whose state the session carries from chunk to chunk."""
    lm = replace(random_stream_model, feature_config=fcfg)
    rng = np.random.default_rng(seed)
    wave = load_audio(SAMPLES / "9300-1-0087.flac")
    sizes = rng.integers(1, 6000, size=len(wave)).tolist()  # includes 1-sample and empty-frame pushes
    events = feed(StreamingSession(lm, endpoint_ms=None), wave, sizes)
    assert_same_as_offline(lm, wave, events)
    # and the offline words are those of forward() over the whole file's features
    feats = lm.features(wave)
    with torch.no_grad():
        lp, _ = lm.model(feats[None], torch.tensor([feats.shape[0]]))
    dec = GreedyCTCStream()
    dec.push(lp[0])
    words = emissions_to_words(dec.emissions, lm.vocab, lm.frame_seconds, max_end_s=len(wave) / RATE)
    assert word_tuples(finals(events)[0].words) == word_tuples(words)


def test_real_model_stream_equals_offline_text(overfit_models):
    lm = load_model(overfit_models["gru"])
    for stem in STEMS:
        wave = load_audio(SAMPLES / f"{stem}.flac")
        words, text = decode_wave(lm, wave)
        t = run_file_stream(lm, wave, echo=False)
        assert t.text == text
        assert word_tuples(t.words) == word_tuples(words)
    # the utterances the model learned come out right
    assert run_file_stream(lm, load_audio(SAMPLES / "9300-1-0088.flac"), echo=False).text == \
        sample_reference("9300-1-0088").lower()


def _one_hot_log_probs(tokens: list[int], vocab_size: int = 29) -> torch.Tensor:
    logits = torch.full((len(tokens), vocab_size), -5.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return torch.log_softmax(logits, dim=-1)


def test_token_repeated_across_chunk_boundary_is_emitted_once():
    # frames: a a | a _ a b | b | b c c ; "a" spans the first boundary, "b" two of them
    frames = [3, 3, 3, 0, 3, 4, 4, 4, 5, 5]
    lp = _one_hot_log_probs(frames)
    dec = GreedyCTCStream()
    emitted = []
    for a, b in [(0, 2), (2, 6), (6, 7), (7, 10)]:
        emitted += [e.token for e in dec.push(lp[a:b])]
    (offline,) = greedy_decode(lp[None], torch.tensor([len(frames)]))
    assert emitted == offline == [3, 3, 4, 5]
    assert [(e.start, e.end) for e in dec.emissions] == [(0, 3), (4, 5), (5, 8), (8, 10)]


def test_a_long_pause_separates_words():
    # a b, 0.8 s without emissions, c, 0.6 s, d; no space token anywhere
    vocab = Vocab()
    a, b, c, d = (vocab.tokens.index(ch) for ch in "abcd")
    dec = GreedyCTCStream()
    dec.push(_one_hot_log_probs([a, b, *[0] * 20, c, *[0] * 15, d]))
    words = emissions_to_words(dec.emissions, vocab, frame_seconds=0.04)
    assert [(w.word, w.start, w.end) for w in words] == [
        ("ab", 0.0, pytest.approx(0.08)), ("cd", pytest.approx(0.88), pytest.approx(1.56))]


def _two_utterances(gap_s: float = 1.5) -> tuple[np.ndarray, int]:
    a = load_audio(SAMPLES / f"{PAIR[0]}.flac")
    b = load_audio(SAMPLES / f"{PAIR[1]}.flac")
    rng = np.random.default_rng(0)
    silence = (1e-4 * rng.standard_normal(round(gap_s * RATE))).astype(np.float32)  # a quiet room
    return np.concatenate([a, silence, b]), len(a)


def test_endpoint_splits_utterances_at_silence(paused_stream_model):
    lm = load_model(paused_stream_model)
    wave, len_a = _two_utterances()
    session = StreamingSession(lm, endpoint_ms=800)
    chunk = RATE // 10
    first_final_at = None
    events = []
    for s in range(0, len(wave), chunk):
        new = session.push(wave[s:s + chunk])
        if first_final_at is None and finals(new):
            first_final_at = session.seconds
        events += new
    events += session.flush()
    fin = finals(events)
    assert [e.utterance for e in fin] == [0, 1]
    # closed by the silence, not by the end of the stream, 0.8 s after the last letter
    assert first_final_at is not None and first_final_at < len_a / RATE + 1.5
    assert fin[0].end <= len_a / RATE + 0.1
    assert fin[1].start >= fin[0].end + 0.8
    assert fin[0].text == sample_reference(PAIR[0]).lower()
    assert fin[1].text  # (the tiny model restarts imperfectly after a pause with its state kept)
    _, offline = decode_wave(lm, wave)
    assert " ".join(e.text for e in fin) == offline

    # the whole file in one push: both utterances close, also the one begun after the cut
    session.reset()
    one_push = finals(session.push(wave) + session.flush())
    assert [e.text for e in one_push] == [e.text for e in fin]

    # without endpointing, one utterance with the same words
    events = feed(StreamingSession(lm, endpoint_ms=None), wave, even(wave, 100))
    (only,) = finals(events)
    assert only.text == offline
    assert word_tuples(only.words) == word_tuples([w for e in fin for w in e.words])


def test_restart_mean_on_endpoint_starts_the_running_mean_afresh(paused_stream_model):
    """--speaker-changes: at each endpoint the running mean starts afresh; without it the mean
    carries on. The first utterance is the same either way (nothing changes before the first
    endpoint)."""
    lm = replace(load_model(paused_stream_model),
                 feature_config=FeatureConfig(cmn_window=1000, cmn_prior=100))
    wave, _ = _two_utterances()
    runs = {}
    for restart in (False, True):
        session = StreamingSession(lm, endpoint_ms=800, restart_mean_on_endpoint=restart)
        at_endpoints, events = [], []
        for s in range(0, len(wave), RATE // 10):
            new = session.push(wave[s:s + RATE // 10])
            if finals(new):  # the chunk's frames were featurised before its endpoint
                at_endpoints.append(session.featurizer.running_mean)
            events += new
        runs[restart] = at_endpoints, finals(events + session.flush())
    (kept, fin_kept), (restarted, fin_restarted) = runs[False], runs[True]
    assert len(kept) == len(restarted) >= 1
    assert all(m.count > 100 for m in kept) and all(m is None for m in restarted)
    assert fin_kept[0].text == fin_restarted[0].text
    assert len(fin_kept) == len(fin_restarted) == 2


def test_reset_restores_the_initial_state(overfit_models):
    lm = load_model(overfit_models["gru"])
    a = load_audio(SAMPLES / "9300-1-0087.flac")
    b = load_audio(SAMPLES / "9301-1-0005.flac")
    for rate in (RATE, 48000):
        a_r, b_r = resample(a, RATE, rate), resample(b, RATE, rate)
        sizes = even(b_r, 100, rate)
        fresh = feed(StreamingSession(lm, sample_rate=rate), b_r, sizes)
        assert finals(fresh)
        session = StreamingSession(lm, sample_rate=rate)
        for s in range(0, len(a_r) * 2 // 3, rate // 10):  # mid-utterance, never flushed
            session.push(a_r[s:s + rate // 10])
        session.reset()
        assert feed(session, b_r, sizes) == fresh
        session.reset()  # and after a flushed stream
        assert feed(session, b_r, sizes) == fresh


@pytest.mark.parametrize("rate", [44100, 48000])
def test_other_input_rates_are_resampled(overfit_models, rate):
    lm = load_model(overfit_models["gru"])
    for stem in ("9300-1-0088", "9301-1-0005"):
        wave = load_audio(SAMPLES / f"{stem}.flac")
        native = " ".join(e.text for e in finals(feed(StreamingSession(lm), wave, even(wave, 100))))
        high = load_audio(SAMPLES / f"{stem}.flac", sample_rate=rate)
        session = StreamingSession(lm, sample_rate=rate)
        events = feed(session, high, even(high, 100, rate))
        text = " ".join(e.text for e in finals(events))
        assert session.seconds == pytest.approx(len(wave) / RATE, abs=0.01)
        assert jiwer.cer(native, text) <= 0.05, (native, text)
        assert finals(events)[-1].end == pytest.approx(finals(
            feed(StreamingSession(lm), wave, even(wave, 100)))[-1].end, abs=0.08)


def test_run_stream_flushes_and_closes_the_source_on_ctrl_c(overfit_models):
    lm = load_model(overfit_models["gru"])
    wave = load_audio(SAMPLES / "9300-1-0087.flac")
    stop = 3 * RATE
    closed = []

    def microphone():  # yields 3 s of speech, then the user presses Ctrl-C
        try:
            for s in range(0, stop, RATE // 10):
                yield wave[s:s + RATE // 10]
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_stream(StreamingSession(lm), microphone(), seen.append)
    assert closed == [True]
    expected = finals(feed(StreamingSession(lm), wave[:stop], even(wave[:stop], 100)))
    assert expected and finals(seen) == expected
    assert seen[-1].kind == "final"


def test_partial_events_do_not_regroup_the_stream(random_stream_model):
    """Per-chunk work is bounded by the current utterance: finals drop the emissions."""
    lm = random_stream_model
    session = StreamingSession(lm, endpoint_ms=None)
    wave = load_audio(SAMPLES / "9300-1-0087.flac")
    events = [e for s in range(0, len(wave), 1600) for e in session.push(wave[s:s + 1600])]
    assert events and all(e.kind == "partial" and e.words == [] for e in events)
    session.flush()
    assert session.decoder.emissions == []


def test_a_final_event_drops_its_utterance_from_the_decoder(paused_stream_model):
    """Per-chunk work stays bounded by the current utterance in an endless stream: when an
    endpoint closes an utterance its emissions leave the decoder."""
    session = StreamingSession(load_model(paused_stream_model), endpoint_ms=800)
    wave, _ = _two_utterances()
    held = []  # emissions the decoder holds after each chunk, and whether a final came
    for s in range(0, len(wave), 1600):
        new = session.push(wave[s:s + 1600])
        held.append((len(session.decoder.emissions), any(e.kind == "final" for e in new)))
    at = next(i for i, (_, final) in enumerate(held) if final)
    assert held[at - 1][0] > 20  # the first utterance's 36 letters were held until its endpoint
    assert held[at][0] < 5  # and dropped with its final


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal (or not)."""

    def __init__(self, tty: bool = True):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_text_printer_redraws_the_partial_line_and_keeps_finals(monkeypatch):
    """What `asr listen` shows on a terminal: the partial line rewritten in place (a shorter one
    blanks the old tail), the final line kept; into a pipe only the final lines."""
    import os

    from asr.live import EventPrinter
    from asr.streaming import StreamEvent

    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: os.terminal_size((30, 24)))
    events = [StreamEvent("partial", "eight of", 0, 1, 0), StreamEvent("partial", "eight off spa", 0, 2, 0),
              StreamEvent("final", "eight of", 0, 2, 0),
              StreamEvent("partial", "a " * 20 + "four", 3, 9, 1)]
    term = _Terminal()
    printer = EventPrinter("text", term)
    for ev in events:
        printer(ev)
    # the long partial shows its newest 29 characters (one line of a 30-column terminal)
    assert term.getvalue() == "\reight of\reight off spa\reight of     \n\r" + ("a " * 20 + "four")[-29:]
    pipe = _Terminal(tty=False)
    printer = EventPrinter("text", pipe)
    for ev in events:
        printer(ev)
    assert pipe.getvalue() == "eight of\n"


def test_cli_endpoint_and_chunk_options_reach_the_stream(paused_stream_model, tmp_path):
    """`transcribe --stream --endpoint-ms 3000` keeps a 1.5 s pause inside one utterance, the
    default 800 closes it there; --chunk-ms changes how often partials come, not the finals.
    (The tiny model's first letters after the pause come late: 2.3 s without a letter.)"""
    import json

    import soundfile as sf
    from click.testing import CliRunner

    from cli import cli

    wave, _ = _two_utterances()
    path = tmp_path / "two.flac"
    sf.write(path, wave, RATE)

    def events(*args):
        r = CliRunner().invoke(cli, ["transcribe", "--stream", "--format", "jsonl", "--decoder",
                                     "greedy", "--model", str(paused_stream_model), *args, str(path)])
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in r.stdout.splitlines()]

    def finals_of(evs):
        return [(e["utterance"], e["text"]) for e in evs if e["type"] == "final"]

    default, long_pause = events(), events("--endpoint-ms", "3000")
    assert [u for u, _ in finals_of(default)] == [0, 1]
    assert [u for u, _ in finals_of(long_pause)] == [0]
    assert finals_of(long_pause)[0][1] == " ".join(t for _, t in finals_of(default))
    coarse = events("--chunk-ms", "1000")
    assert finals_of(coarse) == finals_of(default)
    partials = [sum(e["type"] == "partial" for e in evs) for evs in (default, coarse)]
    assert partials[1] < partials[0] / 3, partials
