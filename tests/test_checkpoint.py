"""Checkpoints: round trip, float16 export, and refusal of unsafe, damaged or foreign files."""

from __future__ import annotations

import os
import pickle
import re
import shlex

import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES

from asr.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    load_model,
    make_checkpoint,
    read_checkpoint,
)
from asr.features import FeatureConfig, FeatureStats
from asr.model import CTCModel, ModelConfig
from asr.text import Vocab
from cli import cli

CFG = ModelConfig(bidirectional=False, hidden_size=24, num_layers=2, conv_channels=4)


def tiny_checkpoint(**overrides) -> dict:
    torch.manual_seed(0)
    stats = FeatureStats(mean=torch.linspace(-10, -4, 80), std=torch.linspace(2, 3, 80))
    ck = make_checkpoint(CTCModel(CFG), FeatureConfig(), stats, Vocab(), meta={"step": 7})
    ck.update(overrides)
    return ck


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    atomic_save(tiny_checkpoint(), path)
    return path


def test_round_trip_restores_everything(good):
    ck = tiny_checkpoint()
    lm = load_model(good)
    assert lm.model.cfg == CFG and not lm.model.training
    for k, v in ck["state_dict"].items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    assert torch.equal(lm.stats.mean, ck["feature_stats"]["mean"])
    assert lm.feature_config == FeatureConfig()
    assert lm.vocab.tokens == Vocab().tokens
    assert lm.meta == {"step": 7}
    assert lm.name == "good"
    assert lm.frame_seconds == pytest.approx(0.04)


def test_atomic_save_leaves_no_temporary_files(good):
    assert sorted(p.name for p in good.parent.iterdir()) == ["good.pt"]


def test_half_precision_export_loads_and_predicts_the_same(tmp_path, good):
    full = load_model(good)
    half_path = tmp_path / "half.pt"
    r = CliRunner().invoke(cli, ["export", str(good), str(half_path)])
    assert r.exit_code == 0, r.output
    raw = torch.load(half_path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    assert half_path.stat().st_size < 0.6 * good.stat().st_size
    half = load_model(half_path)
    assert all(p.dtype == torch.float32 for p in half.model.parameters())  # computed in float32
    x = torch.randn(1, 50, 80)
    with torch.no_grad():
        a, _ = full.model(x, torch.tensor([50]))
        b, _ = half.model(x, torch.tensor([50]))
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


class RunsACommand:
    """Unpickling this runs a shell command (what a malicious model file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Guard for the test below: the payload is live, so its marker proves a refusal."""
    marker = tmp_path / "ran-unsafely"
    pickle.loads(pickle.dumps(RunsACommand(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["inside-checkpoint", "plain-pickle", "torch-save-legacy"])
def test_code_carrying_checkpoint_is_refused_without_running_it(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "inside-checkpoint":
        torch.save(tiny_checkpoint(meta={"note": RunsACommand(marker)}), path)
    elif how == "plain-pickle":
        path.write_bytes(pickle.dumps(RunsACommand(marker)))
    else:
        torch.save({"payload": RunsACommand(marker)}, path, _use_new_zipfile_serialization=False)
    # torch's safe loader names the code it met, except in a raw pickle (not torch.save's format),
    # which it stops reading at once
    reason = ("a raw Python pickle, not a PyTorch checkpoint (unpickling could run code)"
              if how == "plain-pickle" else "the file contains Python objects that could run code "
              "(only plain tensors and containers are accepted)")
    with pytest.raises(CheckpointError, match=re.escape(f"refused: {reason}")):
        load_model(path)
    r = CliRunner().invoke(cli, ["transcribe", "--model", str(path),
                                 str(SAMPLES / "9302-1-0000.flac")])
    assert r.exit_code == 1
    assert isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == [f"Error: {path}: refused: {reason}"]
    assert not marker.exists()


def _damaged(tmp_path, good, kind):
    path = tmp_path / f"{kind}.pt"
    data = good.read_bytes()
    if kind == "empty":
        path.touch()
    elif kind == "plain-pickle":  # pickle protocol 4, not torch.save: no code in it, just foreign
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    elif kind == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-head":
        path.write_bytes(data[:40])
    elif kind == "text":
        path.write_text("this is a README, not a model\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "other-dict":
        torch.save({"model": torch.zeros(3)}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such model file"),
    ("directory", "is a directory"),
    ("empty", "model file is empty"),
    ("truncated-half", "not a readable checkpoint (truncated or foreign file"),
    ("truncated-head", "not a readable checkpoint (truncated or foreign file"),
    ("text", "not a model file (expected a PyTorch checkpoint)"),
    ("list", "not an asr-gru-ctc checkpoint of this project"),
    ("other-dict", "not an asr-gru-ctc checkpoint of this project"),
    ("plain-pickle", "refused: a raw Python pickle, not a PyTorch checkpoint (unpickling could run code)"),
])
def test_damaged_or_foreign_files_give_a_clear_error(tmp_path, good, kind, reason):
    path = _damaged(tmp_path, good, kind)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and reason in msg and "\n" not in msg


def _mutate(ck: dict, kind: str) -> dict:
    sd = ck["state_dict"]
    if kind == "hidden-size":
        ck["model_config"] = {**ck["model_config"], "hidden_size": 32}
    elif kind == "bidirectional-flag":
        ck["model_config"] = {**ck["model_config"], "bidirectional": True}
    elif kind == "missing-weight":
        del sd["classifier.bias"]
    elif kind == "extra-weight":
        sd["attention.weight"] = torch.zeros(2)
    elif kind == "unknown-config-key":
        ck["model_config"] = {**ck["model_config"], "heads": 8}
    elif kind == "unknown-cell":
        ck["model_config"] = {**ck["model_config"], "cell": "transformer"}
    elif kind == "weights-not-tensors":
        ck["state_dict"] = {k: 1.0 for k in sd}
    elif kind == "config-not-a-dict":
        ck["model_config"] = [1, 2]
    elif kind == "stats-wrong-size":
        ck["feature_stats"] = {"mean": torch.zeros(40), "std": torch.ones(40)}
    elif kind == "vocab-wrong-size":
        ck["vocab"] = {"chars": "abc"}
    elif kind == "negative-cmn-window":
        ck["feature_config"] = {**ck["feature_config"], "cmn_window": -5}
    elif kind == "cmn-window-not-int":
        ck["feature_config"] = {**ck["feature_config"], "cmn_window": 2.5}
    elif kind == "negative-floor-gate":
        ck["feature_config"] = {**ck["feature_config"], "cmn_floor_gate": -0.5}
    elif kind == "zero-sample-rate":  # frame times would divide by it
        ck["feature_config"] = {**ck["feature_config"], "sample_rate": 0}
    elif kind == "f-max-above-nyquist":
        ck["feature_config"] = {**ck["feature_config"], "f_max": 9000.0}
    elif kind == "huge-config":  # would need terabytes if we built it before checking
        ck["model_config"] = {**ck["model_config"], "hidden_size": 10**7}
    return ck


@pytest.mark.parametrize("kind", [
    "hidden-size", "bidirectional-flag", "missing-weight", "extra-weight", "unknown-config-key",
    "unknown-cell", "weights-not-tensors", "config-not-a-dict", "stats-wrong-size",
    "vocab-wrong-size", "negative-cmn-window", "cmn-window-not-int", "negative-floor-gate",
    "zero-sample-rate", "f-max-above-nyquist", "huge-config"])
def test_wrong_architecture_gives_a_clear_error(tmp_path, kind):
    path = tmp_path / "wrong.pt"
    torch.save(_mutate(tiny_checkpoint(), kind), path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert "does not match the model architecture" in msg or "inconsistent" in msg


def test_newer_format_version_says_so(tmp_path):
    path = tmp_path / "future.pt"
    torch.save(tiny_checkpoint(format_version=FORMAT_VERSION + 1), path)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1} is newer than "
                                              f"this program supports \\({FORMAT_VERSION}\\)"):
        read_checkpoint(path)


@pytest.mark.parametrize("version", [None, "1", 0])
def test_missing_or_invalid_format_version(tmp_path, version):
    path = tmp_path / "noversion.pt"
    torch.save(tiny_checkpoint(format_version=version), path)
    with pytest.raises(CheckpointError, match="no valid format version"):
        read_checkpoint(path)


@pytest.mark.parametrize("kind", ["truncated-half", "text", "list"])
def test_cli_reports_a_bad_model_in_one_line(tmp_path, good, kind):
    path = _damaged(tmp_path, good, kind)
    r = CliRunner().invoke(cli, ["transcribe", "--model", str(path),
                                 str(SAMPLES / "9302-1-0000.flac")])
    assert r.exit_code == 1
    assert isinstance(r.exception, SystemExit)  # not an unhandled exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: ")
    assert r.stdout == ""


def test_export_of_a_bad_checkpoint_writes_nothing(tmp_path, good):
    src = _damaged(tmp_path, good, "truncated-half")
    dst = tmp_path / "out.pt"
    r = CliRunner().invoke(cli, ["export", str(src), str(dst)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert not dst.exists()


def test_export_averages_several_checkpoints_weight_by_weight(tmp_path, good):
    torch.manual_seed(1)
    other = tiny_checkpoint(meta={"step": 9})
    other["state_dict"] = {k: v + torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in other["state_dict"].items()}
    atomic_save(other, tmp_path / "other.pt")
    dst = tmp_path / "avg.pt"
    r = CliRunner().invoke(cli, ["export", "--float32", str(good), str(tmp_path / "other.pt"), str(dst)])
    assert r.exit_code == 0, r.output
    assert "average of 2 checkpoints" in r.output
    avg = load_model(dst)
    a, b = tiny_checkpoint()["state_dict"], other["state_dict"]
    for k, v in avg.model.state_dict().items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2 if v.is_floating_point() else a[k])
    assert avg.meta["step"] == 9 and avg.meta["averaged_steps"] == [7, 9]


def test_export_refuses_to_average_checkpoints_of_different_models(tmp_path, good):
    wide = tmp_path / "wide.pt"
    atomic_save(make_checkpoint(CTCModel(ModelConfig(bidirectional=False, hidden_size=32, num_layers=2,
                                                     conv_channels=4)),
                                FeatureConfig(), FeatureStats(mean=torch.zeros(80), std=torch.ones(80)),
                                Vocab()), wide)
    dst = tmp_path / "avg.pt"
    r = CliRunner().invoke(cli, ["export", str(good), str(wide), str(dst)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "cannot average: its model differs" in r.stderr
    assert not dst.exists()


def test_export_will_not_overwrite_its_own_source(tmp_path, good):
    before = good.read_bytes()
    r = CliRunner().invoke(cli, ["export", str(good), str(good)])
    assert r.exit_code == 1 and "would overwrite" in r.stderr
    assert good.read_bytes() == before


def test_export_refuses_to_average_checkpoints_of_different_runs(tmp_path, good):
    other = tiny_checkpoint()
    other["feature_stats"] = FeatureStats(mean=torch.zeros(80), std=torch.ones(80)).to_dict()
    atomic_save(other, tmp_path / "other.pt")
    r = CliRunner().invoke(cli, ["export", str(good), str(tmp_path / "other.pt"), str(tmp_path / "avg.pt")])
    assert r.exit_code == 1 and "feature statistics differ" in r.stderr
    assert not (tmp_path / "avg.pt").exists()


def test_plain_pickle_as_model_is_one_line_without_torch_warnings(tmp_path, good):
    path = _damaged(tmp_path, good, "plain-pickle")
    r = CliRunner().invoke(cli, ["transcribe", "--model", str(path), str(SAMPLES / "9302-1-0000.flac")])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"Error: {path}: refused: a raw Python pickle, not a "
                                            "PyTorch checkpoint (unpickling could run code)"]


def test_export_will_not_overwrite_a_training_checkpoint(tmp_path, good):
    """`asr export run/step-1.pt run/step-2.pt` (a forgotten output name) must not destroy step 2's
    optimizer state; an earlier export there may be replaced."""
    training = tmp_path / "step-00000002.pt"
    atomic_save(tiny_checkpoint(train_config={"lr": 1e-3}, run_state={"step": 2},
                                optimizer={"state": {}}), training)
    before = training.read_bytes()
    r = CliRunner().invoke(cli, ["export", str(good), str(training)])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: {training}: a training checkpoint (with its optimizer "
                                "state) is there; export to another file")
    assert training.read_bytes() == before
    exported = tmp_path / "model.pt"
    assert CliRunner().invoke(cli, ["export", str(good), str(exported)]).exit_code == 0
    assert CliRunner().invoke(cli, ["export", "--float32", str(good), str(exported)]).exit_code == 0
    assert load_model(exported).model.classifier.weight.dtype == torch.float32
