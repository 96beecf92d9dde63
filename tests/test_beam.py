"""CTC beam search with the shipped word LM: spelling, context, chunking invariance, timings."""

import pytest
import torch

from asr.beam import (
    DEFAULT_LM,
    BeamConfig,
    BeamCTCStream,
    EndpointedBeam,
    beam_decode,
    emissions_text,
    path_emissions,
)
from asr.decoding import GreedyCTCStream, emissions_to_words, greedy_decode
from asr.lm import LMError
from asr.text import Vocab

VOCAB = Vocab()


def spelled(spec) -> torch.Tensor:
    """(T', V) log-probs that spell `spec`: each item is a character (probability 0.9) or a dict of
    alternatives {char: probability}; every character lasts two frames and is followed by a blank."""
    rows = []
    for item in spec:
        probs = {item: 0.9} if isinstance(item, str) else item
        for _ in range(2):
            p = torch.full((len(VOCAB),), 1e-4)
            for c, q in probs.items():
                p[VOCAB.tokens.index(c)] = q
            rows.append(p / p.sum())
        blank = torch.full((len(VOCAB),), 1e-4)
        blank[0] = 0.9
        rows.append(blank / blank.sum())
    return torch.stack(rows).log()


def greedy_text(lp: torch.Tensor) -> str:
    return VOCAB.decode(greedy_decode(lp[None], torch.tensor([lp.shape[0]]))[0])


def test_shipped_lm_is_small_enough_to_ship():
    assert DEFAULT_LM.exists() and DEFAULT_LM.stat().st_size < 30e6


def test_path_emissions_collapses_repeats_and_keeps_frames():
    lp = torch.log_softmax(torch.randn(8, len(VOCAB), generator=torch.Generator().manual_seed(0)), -1)
    a, b = VOCAB.tokens.index("a"), VOCAB.tokens.index("b")
    path = [0, a, a, 0, a, 1, b, b]
    em = path_emissions(path, lp.numpy(), offset=100)
    assert [(e.token, e.start, e.end) for e in em] == [(a, 101, 103), (a, 104, 105), (1, 105, 106),
                                                       (b, 106, 108)]
    assert em[0].logp_sum == pytest.approx(float(lp[1, a] + lp[2, a]))


def test_lexicon_turns_a_misheard_spelling_into_a_word():
    lp = spelled("the man went hom")
    assert greedy_text(lp) == "the man went hom"
    assert emissions_text(beam_decode(lp, VOCAB), VOCAB) == "the man went home"


@pytest.mark.parametrize("context, expected", [("he walked down to the se", "sea"),
                                               ("she could not se", "see")])
def test_language_model_context_resolves_acoustic_ambiguity(context, expected):
    # the acoustics slightly prefer "e" in both cases; the word before decides
    lp = spelled([*context, {"a": 0.45, "e": 0.55}])
    assert greedy_text(lp).endswith(" see")
    assert emissions_text(beam_decode(lp, VOCAB), VOCAB).split()[-1] == expected


def test_without_the_lm_the_acoustics_decide():
    lp = spelled([*"he walked down to the se", {"a": 0.45, "e": 0.55}])
    text = emissions_text(beam_decode(lp, VOCAB, BeamConfig(lm_weight=0.0, word_score=0.0)), VOCAB)
    assert text.split()[-1] == "see"


def test_chunking_does_not_change_the_search(random_stream_model):
    """Real audio through a random causal model: any chunking gives the same best path."""
    from conftest import SAMPLES

    from asr.audio import load_audio

    lm = random_stream_model
    wave = load_audio(SAMPLES / "9300-1-0088.flac")
    with torch.inference_mode():
        feats = lm.features(wave)
        lp, _ = lm.model(feats[None], torch.tensor([feats.shape[0]]))
    lp = lp[0]
    whole = beam_decode(lp, VOCAB)
    assert whole, "the random model's beam path should spell something"
    for chunk in (1, 7, 40):
        dec = BeamCTCStream(VOCAB)
        partials = []
        for s in range(0, lp.shape[0], chunk):
            dec.push(lp[s:s + chunk])
            partials.append(emissions_text(dec.partial(), VOCAB))
        assert dec.finish() == whole
        assert any(partials)


def test_partials_grow_while_spelling_and_the_stream_clock_runs_on():
    lp = spelled("the man went home")
    dec = BeamCTCStream(VOCAB)
    seen = []
    for s in range(0, lp.shape[0], 6):
        dec.push(lp[s:s + 6])
        seen.append(emissions_text(dec.partial(), VOCAB))
    assert seen[-1] == "the man went home"
    assert "the man w" in seen or "the man we" in seen  # the word being spelled shows up
    first = dec.finish()
    assert emissions_text(first, VOCAB) == "the man went home"
    dec.push(lp)  # a second utterance on the same stream clock
    second = dec.finish()
    assert emissions_text(second, VOCAB) == "the man went home"
    assert second[0].start == first[0].start + lp.shape[0]


def test_words_timings_and_confidences_come_from_the_beam_path():
    lp = spelled("the man went hom")
    words = emissions_to_words(beam_decode(lp, VOCAB), VOCAB, frame_seconds=0.04)
    assert [w.word for w in words] == ["the", "man", "went", "home"]
    assert all(0 <= a.end <= b.start for a, b in zip(words, words[1:], strict=False))
    assert all(w.start < w.end for w in words)
    assert all(0.85 < w.confidence <= 1 for w in words[:3])
    # "home"'s "e" was never heard: the path passes it on a frame where it is unlikely
    assert words[3].confidence < words[2].confidence


def test_endpointed_beam_cuts_at_pauses():
    pause = torch.full((30, len(VOCAB)), -9.0)
    pause[:, 0] = 0.0
    lp = torch.cat([spelled("the man"), pause, spelled("went home"), pause[:3]])
    seg = EndpointedBeam(VOCAB, endpoint_frames=20)
    utts = seg.push(lp[:50]) + seg.push(lp[50:]) + seg.flush()
    assert [emissions_text(u, VOCAB) for u in utts] == ["the man", "went home"]
    at_once = EndpointedBeam(VOCAB, endpoint_frames=20)  # a cut and new speech in one push
    assert [emissions_text(u, VOCAB) for u in at_once.push(lp) + at_once.flush()] == [
        "the man", "went home"]
    whole = EndpointedBeam(VOCAB, endpoint_frames=None)
    assert [emissions_text(u, VOCAB) for u in whole.push(lp) + whole.flush()] == [
        "the man went home"]
    # greedy decides where speech is; only blanks -> nothing
    silent = EndpointedBeam(VOCAB, endpoint_frames=20)
    assert silent.push(pause) + silent.flush() == []
    assert GreedyCTCStream().push(pause) == []


@pytest.mark.parametrize("content", [b"", b"not an arpa file\n", b"\x00\x01\x02garbage"])
def test_bad_lm_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "lm.arpa"
    path.write_bytes(content)
    with pytest.raises(LMError, match=str(path)):
        BeamCTCStream(VOCAB, BeamConfig(lm_path=str(path)))
    with pytest.raises(LMError, match="no such"):
        BeamCTCStream(VOCAB, BeamConfig(lm_path=str(tmp_path / "missing.arpa")))


def test_lm_that_kenlm_refuses_says_why(tmp_path):
    """KenLM's message starts with its source location; the reason is what the user needs."""
    path = tmp_path / "unigram.arpa"
    path.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\n-1.0\t</s>\n-1.0\tclubs\n"
                    "\n\\end\\\n")
    with pytest.raises(LMError) as e:
        BeamCTCStream(VOCAB, BeamConfig(lm_path=str(path)))
    msg = str(e.value)
    assert msg.startswith(f"{path}: KenLM cannot read this language model (")
    assert "assumes at least a bigram model" in msg and ".cc:" not in msg and "\n" not in msg


@pytest.mark.parametrize("field, value", [("beam_size", 0), ("beam_size", 10**9), ("beam_size", 2.5),
                                          ("lm_weight", float("nan")), ("lm_weight", -1.0),
                                          ("word_score", float("inf")), ("beam_threshold", 0.0)])
def test_beam_config_refuses_unusable_settings(field, value):
    with pytest.raises(ValueError, match=field):
        BeamConfig(**{field: value})


# ----------------------------------------------------------------------------- files and streams


def _session_events(lm, wave, chunk_samples, **kwargs):
    from asr.streaming import StreamingSession

    session = StreamingSession(lm, **kwargs)
    events = []
    for s in range(0, len(wave), chunk_samples):
        events += session.push(wave[s:s + chunk_samples])
    return events + session.flush()


@pytest.mark.parametrize("stem", ["9300-1-0088", "9300-1-0087"])  # trained on / never heard
def test_streaming_beam_finals_equal_the_offline_beam_result(overfit_models, stem):
    from conftest import SAMPLES, sample_reference

    from asr.audio import load_audio
    from asr.checkpoint import load_model
    from asr.transcribe import transcribe_wave

    lm = load_model(overfit_models["gru"])
    wave = load_audio(SAMPLES / f"{stem}.flac")
    beam = BeamConfig()
    offline = transcribe_wave(lm, wave, beam=beam)
    if stem == "9300-1-0088":
        assert offline.text == sample_reference(stem).lower()
    for chunk_samples in (1600, 591):  # 100 ms pushes, and an odd size
        events = _session_events(lm, wave, chunk_samples, beam=beam)
        finals = [e for e in events if e.kind == "final"]
        assert " ".join(e.text for e in finals) == offline.text
        assert [w.to_dict() for e in finals for w in e.words] == [w.to_dict() for w in offline.words]
        partials = [e.text for e in events if e.kind == "partial"]
        assert len(partials) >= 3 and partials[-1]  # the text updated as the audio arrived
    # a consumer of final text only: the same finals, and no partial readouts
    quiet = _session_events(lm, wave, 1600, beam=beam, partials=False)
    assert [e.kind for e in quiet] == ["final"] * len(finals)
    assert [e.to_dict() for e in quiet] == [e.to_dict() for e in finals]


def test_streaming_beam_without_endpoints_equals_one_search_over_the_file(overfit_models):
    from conftest import SAMPLES

    from asr.audio import load_audio
    from asr.checkpoint import load_model

    lm = load_model(overfit_models["gru"])
    wave = load_audio(SAMPLES / "9301-1-0005.flac")
    with torch.inference_mode():
        feats = lm.features(wave)
        lp, _ = lm.model(feats[None], torch.tensor([feats.shape[0]]))
    expected = emissions_text(beam_decode(lp[0], lm.vocab), lm.vocab)
    events = _session_events(lm, wave, 1600, beam=BeamConfig(), endpoint_ms=None)
    assert [e.text for e in events if e.kind == "final"] == [expected]
    assert expected == "eight of spades four of clubs seven of hearts"


def test_cli_beam_is_the_default_and_greedy_still_works(overfit_models):
    from click.testing import CliRunner
    from conftest import SAMPLES, sample_reference

    from cli import cli

    audio = str(SAMPLES / "9302-1-0000.flac")
    ref = sample_reference("9302-1-0000").lower()
    for extra in ([], ["--decoder", "beam", "--lm", str(DEFAULT_LM), "--beam-size", "8",
                       "--lm-weight", "0.5", "--word-score", "1"], ["--decoder", "greedy"]):
        r = CliRunner().invoke(cli, ["transcribe", "--model", str(overfit_models["bigru"]),
                                     *extra, audio])
        assert r.exit_code == 0, r.output
        assert r.output.strip() == ref
    r = CliRunner().invoke(cli, ["transcribe", "--stream", "--model", str(overfit_models["gru"]),
                                 audio])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == ref


def test_library_transcribe_matches_the_cli_with_either_decoder(overfit_models, tmp_path):
    """`asr.transcribe` is greedy unless given a BeamConfig; with BeamConfig() it prints what the
    command prints by default."""
    from click.testing import CliRunner
    from conftest import SAMPLES

    import asr
    from cli import cli

    lm = asr.load_model(overfit_models["bigru"])
    audio = str(SAMPLES / "9300-1-0088.flac")
    for decoder, beam in (("beam", asr.BeamConfig()), ("greedy", None)):
        r = CliRunner().invoke(cli, ["transcribe", "--model", str(overfit_models["bigru"]),
                                     "--decoder", decoder, audio])
        assert r.exit_code == 0, r.output
        t = asr.transcribe(lm, audio, beam=beam)
        assert t.text and r.output.strip() == t.text
    # the given config is the one searched: an LM without "disposed" cannot spell it
    words = "he was not an ill young man dispose".split()
    arpa = tmp_path / "small.arpa"
    arpa.write_text(f"\\data\\\nngram 1={len(words) + 3}\nngram 2=1\n\n\\1-grams:\n"
                    "-1.0\t<s>\t-0.3\n-1.0\t</s>\n-1.5\t<unk>\n"
                    + "".join(f"-1.0\t{w}\t-0.3\n" for w in words)
                    + "\n\\2-grams:\n-0.5\t<s> he\n\n\\end\\\n")
    small = asr.transcribe(lm, audio, beam=asr.BeamConfig(lm_path=str(arpa))).text
    assert "disposed" in t.text and "disposed" not in small.split()


@pytest.mark.parametrize("args, message, code", [
    (["--lm", "no/such/lm.arpa"], "no such language model file", 1),
    (["--decoder", "greedy", "--lm-weight", "0.3"], "need --decoder beam", 2),  # usage
])
def test_cli_decoder_option_errors_are_one_line(overfit_models, args, message, code):
    from click.testing import CliRunner
    from conftest import SAMPLES

    from cli import cli

    r = CliRunner().invoke(cli, ["transcribe", "--model", str(overfit_models["bigru"]), *args,
                                 str(SAMPLES / "9302-1-0000.flac")])
    assert r.exit_code == code and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1]
    if code == 1:  # a file that cannot be used: that one line and nothing else
        assert len(lines) == 1
    else:  # usage: click's usage line and hint above it, as for its own errors
        assert lines[0].startswith("Usage: ")


def test_cli_evaluate_reports_the_decoder(overfit_models):
    import json

    from click.testing import CliRunner
    from conftest import CORPUS

    from cli import cli

    out = {}
    for decoder in ("greedy", "beam"):
        r = CliRunner().invoke(cli, ["evaluate", "--data", str(CORPUS / "sphinx"), "--model",
                                     str(overfit_models["bigru"]), "--decoder", decoder,
                                     "--format", "json"])
        assert r.exit_code == 0, r.output
        out[decoder] = json.loads(r.output.strip().splitlines()[-1])
    assert out["greedy"]["decoder"] == "greedy"
    assert out["beam"]["decoder"]["lm_path"] == str(DEFAULT_LM)
    assert out["beam"]["utterances"] == out["greedy"]["utterances"] == 11
