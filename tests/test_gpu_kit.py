"""scripts/gpu_kit.py: corpora split into size-bounded parts survive the trip to the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import CORPUS

from asr.data import load_corpora
from asr.text import Vocab

_spec = importlib.util.spec_from_file_location(
    "gpu_kit", Path(__file__).resolve().parent.parent / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(_spec)
sys.modules["gpu_kit"] = gpu_kit  # its worker processes find their functions by module name
_spec.loader.exec_module(gpu_kit)


def _by_id(path) -> dict:
    utts, _ = load_corpora([str(path)], Vocab(), skip_bad=False)
    return {u.id: u for u in utts}


def test_pack_then_unpack_gives_the_same_corpus(tmp_path):
    kit = tmp_path / "kit"
    gpu_kit.pack([str(CORPUS / "sphinx"), str(CORPUS / "synth")], kit, kbps=0, part_mb=0.25, workers=1)
    parts = sorted(kit.glob("part-*"))
    assert len(parts) >= 3  # ~0.7 MB of audio in parts of at most 0.25 MB (whole chapters)
    for p in parts:
        chapters = [t.parent for t in p.rglob("*.trans.txt")]
        sizes = [sum(f.stat().st_size for f in c.iterdir()) for c in chapters]
        assert len(chapters) == 1 or sum(sizes) <= 0.25e6
    gpu_kit.unpack(kit, tmp_path / "data", workers=2)
    for name in ("sphinx", "synth"):
        before, after = _by_id(CORPUS / name), _by_id(tmp_path / "data" / name)
        assert after.keys() == before.keys()
        for uid, u in before.items():
            assert after[uid].text == u.text
            assert after[uid].path.endswith(".flac")
            a, _ = sf.read(u.path, dtype="int16")
            b, _ = sf.read(after[uid].path, dtype="int16")
            assert np.array_equal(a, b)  # copied, then decoded losslessly


def test_hours_limit_takes_the_first_files_and_their_transcript_lines(tmp_path):
    kit = tmp_path / "kit"
    everything = _by_id(CORPUS / "sphinx")
    gpu_kit.pack([f"{CORPUS / 'sphinx'}@0.002"], kit, kbps=0, part_mb=40, workers=1)  # 7.2 s
    gpu_kit.unpack(kit, tmp_path / "data", workers=1)
    taken = _by_id(tmp_path / "data" / "sphinx")
    assert 0 < len(taken) < len(everything)
    assert sum(u.duration for u in taken.values()) >= 7.2
    assert all(taken[i].text == everything[i].text for i in taken)


def test_reencoding_lowers_the_rate_and_keeps_the_speech(tmp_path):
    kit = tmp_path / "kit"
    gpu_kit.pack([str(CORPUS / "sphinx")], kit, kbps=12, part_mb=40, workers=1)
    files = list(kit.rglob("*.opus"))
    seconds = sum(sf.info(f).duration for f in files)
    kbps = 8 * sum(f.stat().st_size for f in files) / seconds / 1000
    assert len(files) == 11 and 9 < kbps < 16
    gpu_kit.unpack(kit, tmp_path / "data", workers=1)
    u = _by_id(tmp_path / "data" / "sphinx")["9300-1-0088"]
    orig, _ = sf.read(CORPUS / "sphinx/9300/1/9300-1-0088.flac", dtype="float32")
    new, _ = sf.read(u.path, dtype="float32")
    n = min(len(orig), len(new))
    assert abs(len(orig) - len(new)) < 400
    assert np.corrcoef(orig[:n], new[:n])[0, 1] > 0.8  # the same waveform, not silence or noise


def test_corpus_names():
    assert gpu_kit.corpus_name(Path("/d/synth/LibriSpeech/train")) == "synth-train"
    assert gpu_kit.corpus_name(Path("/d/librispeech-train")) == "librispeech-train"


def test_plan_fits_the_steps_into_the_time_left(tmp_path):
    rows = [{"event": "train", "step": s, "elapsed_s": e} for s, e in [(10, 30.0), (20, 35.0), (30, 40.0)]]
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"event": "eval", "step": 30}]))
    assert gpu_kit.plan(m, seconds=100, skip=1) == 200  # 0.5 s per step once started
    with pytest.raises(SystemExit):
        gpu_kit.plan(m, seconds=100, skip=2)
    with pytest.raises(SystemExit, match="missing.jsonl"):  # a probe that never started: one line
        gpu_kit.plan(tmp_path / "missing.jsonl", seconds=100, skip=1)
