"""End to end: a model trained by `train()` on real utterances, transcribed through the CLI."""

import json

from click.testing import CliRunner
from conftest import CORPUS, OVERFIT_IDS

from cli import cli


def _refs():
    refs = {}
    for trans in (CORPUS / "sphinx").rglob("*.trans.txt"):
        for ln in trans.read_text().splitlines():
            uid, text = ln.split(" ", 1)
            refs[uid] = (trans.parent / f"{uid}.flac", text.lower())
    return refs


def test_overfit_bigru_transcribes_training_utterances(overfit_models):
    refs = _refs()
    for uid in OVERFIT_IDS:
        path, text = refs[uid]
        r = CliRunner().invoke(cli, ["transcribe", "--model", str(overfit_models["bigru"]), str(path)])
        assert r.exit_code == 0, r.output
        assert r.output.strip() == text


def test_overfit_json_has_word_timings(overfit_models):
    path, text = _refs()["9302-1-0000"]
    r = CliRunner().invoke(cli, ["transcribe", "--model", str(overfit_models["bigru"]), "--format",
                                 "json", str(path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["text"] == text
    assert [w["word"] for w in d["words"]] == text.split()
    assert all(0 <= w["start"] < w["end"] <= d["duration"] + 1e-6 for w in d["words"])
    assert all(0 < w["confidence"] <= 1 for w in d["words"])
    starts = [w["start"] for w in d["words"]]
    assert starts == sorted(starts)
