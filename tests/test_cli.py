"""The `asr` command line: help for every command, output formats, several inputs, model errors."""

from __future__ import annotations

import difflib
import json
import re

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import SAMPLES, sample_reference

import asr.checkpoint
from cli import cli

STEM = "9300-1-0088"  # one of the utterances the overfit models learned
AUDIO = SAMPLES / f"{STEM}.flac"
DURATION = sf.info(AUDIO).duration
TEXT = sample_reference(STEM).lower()
OTHER = SAMPLES / "9302-1-0000.flac"  # also learned by the overfit models


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def transcribe(*args: str):
    """`asr transcribe` with the greedy decoder: these tests are about the command, not the LM."""
    return run("transcribe", "--decoder", "greedy", *args)


def ok(r):
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    r = ok(run(name, "--help"))
    assert r.output.startswith("Usage: ") and f" {name} [OPTIONS]" in r.output.splitlines()[0]
    summary = cli.commands[name].help.strip().split("\n")[0]
    assert " ".join(summary.split()) in " ".join(r.output.split())  # the docstring, re-wrapped
    assert ok(run(name, "-h")).output == r.output


def test_group_help_lists_every_command():
    out = ok(run("--help")).output
    for name in cli.commands:
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_version():
    from importlib.metadata import version

    assert ok(run("--version")).output.endswith(f" version {version('asr-gru')}\n")


TS = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def _seconds(m: re.Match) -> float:
    h, mi, s, ms = (int(x) for x in m.groups())
    return 3600 * h + 60 * mi + s + ms / 1000


def parse_cues(text: str, sep: str) -> list[tuple[float, float, str]]:
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0] == "WEBVTT":
            continue
        if sep == ",":  # SRT: a running index first
            assert lines[0] == str(len(cues) + 1)
            lines = lines[1:]
        m = re.fullmatch(f"{TS} --> {TS}".replace("[,.]", re.escape(sep)), lines[0])
        assert m, lines[0]
        a = _seconds(re.match(TS, m.group(0)))
        b = _seconds(re.search(TS + "$", m.group(0)))
        cues.append((a, b, " ".join(lines[1:])))
    return cues


@pytest.mark.parametrize("arch", ["bigru", "gru"])
def test_txt_is_the_transcript(overfit_models, arch):
    r = ok(transcribe("--model", overfit_models[arch], AUDIO))
    assert r.stdout == TEXT + "\n"
    assert r.stderr == ""


@pytest.mark.parametrize("arch", ["bigru", "gru"])
def test_json_output(overfit_models, arch):
    d = json.loads(ok(transcribe("--model", overfit_models[arch], "--format", "json", AUDIO)).stdout)
    assert set(d) == {"text", "duration", "model", "processing_time", "words"}
    assert d["text"] == TEXT
    assert d["duration"] == pytest.approx(DURATION, abs=1e-3)
    assert d["model"] == overfit_models[arch].stem
    assert d["processing_time"] > 0
    assert [w["word"] for w in d["words"]] == TEXT.split()
    for w in d["words"]:
        assert set(w) == {"word", "start", "end", "confidence"}
        assert 0 <= w["start"] < w["end"] <= d["duration"]
        assert 0 < w["confidence"] <= 1
    assert all(a["end"] <= b["start"] for a, b in zip(d["words"], d["words"][1:], strict=False))


@pytest.mark.parametrize("fmt,sep", [("srt", ","), ("vtt", ".")])
def test_subtitles_parse_with_monotonic_times_inside_the_audio(overfit_models, fmt, sep):
    out = ok(transcribe("--model", overfit_models["bigru"], "--format", fmt, AUDIO)).stdout
    if fmt == "vtt":
        assert out.startswith("WEBVTT\n\n")
    cues = parse_cues(out, sep)
    assert cues
    assert " ".join(text for _, _, text in cues) == TEXT
    last_end = 0.0
    for a, b, _ in cues:
        assert last_end <= a < b <= DURATION + 1e-3
        last_end = b


def test_long_file_words_keep_their_place_across_decoding_windows(overfit_models, tmp_path):
    """Past 30 s the offline model decodes window by window (cut in the quietest 200 ms): words of
    a later window must come out at their true place in the file, none lost, and the captions
    must break at the pauses."""
    from asr.audio import load_audio
    from asr.transcribe import MAX_WINDOW_S, iter_windows

    sr = 16000
    x, y = load_audio(AUDIO), load_audio(SAMPLES / "9301-1-0005.flac")
    gap = np.zeros(25 * sr, np.float32)
    wave = np.concatenate([x, gap, y, gap, x, np.zeros(sr, np.float32)])
    path = tmp_path / "long.flac"
    sf.write(path, wave, sr)
    starts = [a for a, _ in iter_windows([wave])]
    assert len(wave) / sr > 2 * MAX_WINDOW_S and len(starts) >= 3

    def words(p):
        d = json.loads(ok(transcribe("--model", overfit_models["bigru"], "--decoder", "greedy",
                                     "--format", "json", p)).stdout)
        return d, [(w["word"], w["start"], w["end"]) for w in d["words"]]

    d, long_words = words(path)
    assert d["duration"] == pytest.approx(len(wave) / sr, abs=1e-3)
    assert all(a[2] <= b[1] for a, b in zip(long_words, long_words[1:], strict=False))
    assert all(0 <= s < e <= d["duration"] for _, s, e in long_words)
    # each clip's words where the clip lies in the file (the model learned the clips, not what
    # long silence does to their first and last letters: half the words may differ per clip)
    for clip, offset, n in ((AUDIO, 0, len(x)), (SAMPLES / "9301-1-0005.flac", len(x) + len(gap), len(y)),
                            (AUDIO, 2 * len(gap) + len(x) + len(y), len(x))):
        alone = words(clip)[1]
        here = [w for w in long_words if offset / sr - 0.5 <= w[1] < (offset + n) / sr]
        match = difflib.SequenceMatcher(a=[w for w, _, _ in alone], b=[w for w, _, _ in here],
                                        autojunk=False)
        pairs = [(alone[b.a + k], here[b.b + k]) for b in match.get_matching_blocks()
                 for k in range(b.size)]
        assert len(pairs) >= max(4, len(alone) // 2), (alone, here)
        for (_, s_alone, _), (_, s_here, _) in pairs:
            assert s_here == pytest.approx(s_alone + offset / sr, abs=0.05)  # within about a frame
    cues = parse_cues(ok(transcribe("--model", overfit_models["bigru"], "--decoder", "greedy",
                                    "--format", "srt", path)).stdout, ",")
    assert len(cues) >= 3 and all(b - a <= 6.0 + 1e-6 for a, b, _ in cues)
    assert all(c2[0] - c1[1] > 1.0 for c1, c2 in zip(cues, cues[1:], strict=False)
               if c2[0] > c1[1] + 5)  # the 25 s pauses separate cues


def test_captions_break_at_pauses_word_counts_and_durations():
    from asr.decoding import Word
    from asr.transcribe import _ts, cues

    def w(start, length=0.3):
        return Word("w", start, start + length, 1.0)

    # 14 quick words: 12 then 2; a pause of over 1 s; 10 slow words spanning more than 6 s
    words = [w(0.4 * i) for i in range(14)] + [w(10 + 0.7 * i) for i in range(10)]
    got = cues(words)
    assert [len(text.split()) for _, _, text in got] == [12, 2, 9, 1]
    assert got[1] == (0.4 * 12, 0.4 * 13 + 0.3, "w w")
    assert got[2][0] == 10 and got[2][1] - got[2][0] <= 6.0
    assert cues([]) == []
    assert _ts(3725.5, ",") == "01:02:05,500" and _ts(59.9996, ".") == "00:01:00.000"


def test_output_dir_writes_one_file_per_input_and_format(overfit_models, tmp_path):
    out = tmp_path / "out" / "nested"
    for fmt in ("txt", "json", "srt", "vtt"):
        r = ok(transcribe("--model", overfit_models["bigru"], "--format", fmt,
                   "--output-dir", out, AUDIO, OTHER))
        assert r.stdout == ""  # the transcripts went to files
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{s}.{f}" for s in (STEM, "9302-1-0000") for f in ("txt", "json", "srt", "vtt"))
    assert (out / f"{STEM}.txt").read_text() == TEXT + "\n"
    assert json.loads((out / "9302-1-0000.json").read_text())["text"] == "go forward ten meters"


def test_one_bad_input_among_several(overfit_models, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_text("not audio")
    r = transcribe("--model", overfit_models["bigru"], AUDIO, bad, OTHER)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stdout == f"{TEXT}\ngo forward ten meters\n"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {bad}: cannot decode audio (Format not recognised.)"]


def test_missing_default_model_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(asr.checkpoint, "DEFAULT_OFFLINE_MODEL", tmp_path / "models" / "bigru.pt")
    r = transcribe(AUDIO)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == [
        f"Error: default model {tmp_path / 'models' / 'bigru.pt'} is missing: reinstall from a full "
        "checkout, or train one with `asr train` and pass it with --model"]


def test_missing_model_file(tmp_path):
    r = transcribe("--model", tmp_path / "nope.pt", AUDIO)
    assert r.exit_code == 1
    assert r.stderr.strip() == f"Error: {tmp_path / 'nope.pt'}: no such model file"


@pytest.mark.parametrize("args", [
    ["--format", "docx"], ["--threads", "0"], ["--threads", "100000"], ["--device", "tpu"],
    ["--precision", "int4"], ["--no-such-option"], ["--lm-weight", "nan"], ["--lm-weight", "inf"],
    ["--word-score", "nan"], ["--word-score", "-inf"], ["--model", ""], ["--output-dir", ""],
    ["--lm", ""], []])
def test_usage_errors_exit_2(args):
    r = transcribe(*args, *([AUDIO] if args else []))
    assert r.exit_code == 2
    assert "Usage:" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_shows_no_empty_bounds(name):
    """A range option without a bound must not print one (click once showed "[x<=None]")."""
    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output
    assert "None" not in r.output


def test_output_dir_that_is_a_file(overfit_models, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = transcribe("--model", overfit_models["bigru"], "--output-dir", f, AUDIO)
    assert r.exit_code == 2  # click refuses the option value itself
    assert "'--output-dir': Directory" in r.stderr and "is a file" in r.stderr
    r = transcribe("--model", overfit_models["bigru"], "--output-dir", f / "sub", AUDIO)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stderr.strip() == f"Error: --output-dir {f / 'sub'}: Not a directory"
    assert f.read_text() == "keep me"


def test_output_dir_refuses_inputs_that_would_overwrite_each_other(overfit_models, tmp_path):
    twin = tmp_path / "a" / f"{STEM}.wav"
    twin.parent.mkdir()
    sf.write(twin, sf.read(AUDIO)[0], 16000)
    r = transcribe("--model", overfit_models["bigru"], "--output-dir", tmp_path / "out", AUDIO, twin)
    assert r.exit_code == 1
    assert f"several inputs would write {STEM}.txt" in r.stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_will_not_overwrite_an_input(overfit_models, tmp_path):
    """An audio file named like a transcript (clip.txt) must not be replaced by its transcript."""
    clip = tmp_path / "clip.txt"
    clip.write_bytes(AUDIO.read_bytes())
    r = transcribe("--model", overfit_models["bigru"], "--output-dir", tmp_path, clip)
    assert r.exit_code == 1
    assert r.stderr.strip() == ("Error: --output-dir: the transcript clip.txt would overwrite an "
                                "input file; choose another folder")
    assert clip.read_bytes() == AUDIO.read_bytes()
    ok(transcribe("--model", overfit_models["bigru"], "--output-dir", tmp_path / "out", clip))
    assert (tmp_path / "out" / "clip.txt").read_text().strip() == TEXT


def test_an_absurd_beam_is_one_line(overfit_models):
    r = run("transcribe", "--model", overfit_models["bigru"], "--beam-size", "3000000000", AUDIO)
    assert r.exit_code == 1
    assert r.stderr.strip() == ("Error: beam search: beam_size must be a whole number from 1 to "
                                "10000, not 3000000000")


def test_stream_needs_a_unidirectional_model(overfit_models):
    r = transcribe("--stream", "--model", overfit_models["bigru"], AUDIO)
    assert r.exit_code == 1
    assert "--stream needs a unidirectional model" in r.stderr


def test_listen_needs_a_unidirectional_model(overfit_models):
    """Refused before any microphone is opened (so also on a machine without one)."""
    r = CliRunner().invoke(cli, ["listen", "--model", str(overfit_models["bigru"])])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: {overfit_models['bigru']}: listen needs a unidirectional "
                                "model (e.g. models/gru-stream.pt)")


def test_missing_default_lm_says_what_to_do(overfit_models, monkeypatch, tmp_path):
    import asr.beam

    monkeypatch.setattr(asr.beam, "DEFAULT_LM", tmp_path / "lm.arpa.gz")
    r = run("transcribe", "--model", overfit_models["bigru"], AUDIO)  # the beam decoder, the default
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: default language model {tmp_path / 'lm.arpa.gz'} is missing: "
                                "reinstall from a full checkout, pass one with --lm, or use "
                                "--decoder greedy")
    assert ok(transcribe("--model", overfit_models["bigru"], AUDIO)).stdout == TEXT + "\n"  # greedy


@pytest.mark.parametrize("flag", [False, True])
def test_speaker_changes_reaches_the_streaming_session(overfit_models, monkeypatch, flag):
    """`--speaker-changes` turns on the session's running-mean restart at endpoints (its effect:
    tests/test_streaming.py, tests/test_features.py); without it the session keeps the mean."""
    import asr.live

    seen = []

    class Spy(asr.live.StreamingSession):
        def __init__(self, *a, **kw):
            seen.append(kw.get("restart_mean_on_endpoint", False))
            super().__init__(*a, **kw)

    monkeypatch.setattr(asr.live, "StreamingSession", Spy)
    ok(transcribe("--stream", *(["--speaker-changes"] if flag else []), "--model",
                  overfit_models["gru"], AUDIO))
    assert seen == [flag]


def _events(jsonl: str, path) -> list[dict]:
    events = [json.loads(line) for line in jsonl.splitlines()]
    assert events and all(e["file"] == str(path) for e in events)
    assert {e["type"] for e in events} == {"partial", "final"}
    return events


def test_stream_jsonl_prints_every_event_of_each_file(overfit_models, tmp_path):
    """`transcribe --stream --format jsonl`: the events `listen --format jsonl` would print, each
    naming its file; the finals make up the transcript; --output-dir writes them per file."""
    r = ok(transcribe("--stream", "--format", "jsonl", "--model", overfit_models["gru"], AUDIO,
                      OTHER))
    by_file = {}
    for path in (AUDIO, OTHER):
        mine = [line for line in r.stdout.splitlines() if json.loads(line)["file"] == str(path)]
        events = by_file[path] = _events("\n".join(mine), path)
        finals = [e for e in events if e["type"] == "final"]
        assert " ".join(e["text"] for e in finals) == sample_reference(path.stem).lower()
        ends = [e["end"] for e in events if e["type"] == "partial"]  # audio heard so far
        assert ends == sorted(ends)
        spans = [(e["start"], e["end"]) for e in finals]
        assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:] + [(99.0, 0)], strict=True))
        assert spans[-1][1] <= sf.info(path).duration + 0.01
        first_final = next(i for i, e in enumerate(events) if e["type"] == "final")
        assert events[first_final - 1]["type"] == "partial"  # text showed before it was final
    ok(transcribe("--stream", "--format", "jsonl", "--model", overfit_models["gru"],
                  "--output-dir", tmp_path, AUDIO))
    written = _events((tmp_path / f"{STEM}.jsonl").read_text(), AUDIO)
    assert [e for e in written if e["type"] == "final"] == [
        e for e in by_file[AUDIO] if e["type"] == "final"]


def test_jsonl_needs_stream(overfit_models):
    r = transcribe("--format", "jsonl", "--model", overfit_models["bigru"], AUDIO)
    assert r.exit_code == 2  # options that do not go together: usage, as click's own errors
    assert "--format jsonl is the event stream of --stream" in r.stderr
    assert "Traceback" not in r.output


def test_streaming_decodes_on_one_thread_unless_told(overfit_models):
    """Per-chunk work is too small to share: extra threads only spin-wait (and, on a busy CPU,
    made streamed decoding up to 100x slower), so --stream uses one thread by default."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for args, want in ((["--stream"], 1), (["--stream", "--threads", "2"], 2), ([], 2)):
            model = overfit_models["gru" if args else "bigru"]
            r = transcribe(*args, "--model", model, AUDIO)
            ok(r)
            assert r.stdout.strip() == sample_reference(STEM).lower()
            assert torch.get_num_threads() == want, args
            torch.set_num_threads(2)
    finally:
        torch.set_num_threads(before)


def test_cuda_request_without_a_gpu_is_a_clear_error(overfit_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    r = transcribe("--device", "cuda", "--model", overfit_models["bigru"], AUDIO)
    assert r.exit_code == 1
    assert r.stderr.strip() == "Error: --device cuda: no CUDA GPU is available"


@pytest.mark.parametrize("arch,args", [("bigru", []), ("gru", ["--stream"])])
def test_bfloat16_precision_transcribes(overfit_models, arch, args):
    r = ok(transcribe(*args, "--precision", "bfloat16", "--model", overfit_models[arch], AUDIO))
    assert " ".join(r.stdout.split()) == TEXT


@pytest.mark.parametrize("name", ["transcribe", "listen", "evaluate"])
def test_precision_choices_are_the_models(name):
    from asr.model import PRECISIONS

    (option,) = [p for p in cli.commands[name].params if p.name == "precision"]
    assert list(option.type.choices) == list(PRECISIONS)


def test_bfloat16_on_a_gpu_is_refused(overfit_models):
    r = transcribe("--device", "cuda", "--precision", "bfloat16", "--model", overfit_models["bigru"],
                   AUDIO)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: --precision bfloat16 is for --device cpu " \
        "(on a GPU the model is fast in float32)"
