"""Crash-safe training: SIGKILL at any moment (also in the middle of a checkpoint write), Ctrl-C,
a full disk, a corrupt newest checkpoint, audio that breaks during a run. The run is never lost:
--resume continues from the last complete checkpoint and ends with the same weights as a run that
was never interrupted.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CORPUS, make_subcorpus

from asr.audio import AudioError
from asr.checkpoint import read_checkpoint
from asr.train import CKPT_DIR, TrainConfig, load_latest_checkpoint, train
from cli import cli

pytestmark = pytest.mark.slow

IDS = ("9301-1-0001", "9301-1-0002", "9301-1-0003", "9301-1-0004", "9301-1-0005", "9302-1-0000")
STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_subcorpus(CORPUS / "sphinx", tmp_path_factory.mktemp("crash") / "corpus", IDS)


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ASR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the CLI's --threads 1 below changes it for this process
    mp.undo()


def train_args(corpus: Path, out: Path) -> list[str]:
    # augmentation on (the default), dropout on, a checkpoint after every step
    return ["train", "--train", str(corpus), "--out", str(out), "--hidden-size", "32",
            "--num-layers", "2", "--conv-channels", "4", "--dropout", "0.2", "--max-steps", str(STEPS),
            "--batch-seconds", "8", "--warmup-steps", "2", "--num-workers", "0", "--save-every", "1",
            "--log-every", "1", "--threads", "1"]


def run_cli(args: list[str]):
    r = CliRunner().invoke(cli, args)
    assert "Traceback" not in r.output, r.output
    return r


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """Final weights of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_cli(train_args(corpus, out))
    assert r.exit_code == 0, r.output
    return read_checkpoint(out / CKPT_DIR / f"step-{STEPS:08d}.pt")["state_dict"]


def assert_same_weights(run: Path, reference: dict) -> None:
    got = read_checkpoint(run / CKPT_DIR / f"step-{STEPS:08d}.pt")["state_dict"]
    for k, v in reference.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def assert_checkpoints_complete(run: Path) -> int:
    """Every step-*.pt reads back; returns the newest step (0 if none)."""
    steps = [read_checkpoint(p)["run_state"]["step"] for p in (run / CKPT_DIR).glob("step-*.pt")]
    return max(steps, default=0)


def spawn(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 900.0) -> bool:
    """Poll until condition() holds (True) or the process has ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the training process")


KILL_IN_SAVE = """
import io, os, signal, sys
import torch

kill_at, calls, real_save = int(sys.argv[1]), [0], torch.save

def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:  # write half of the checkpoint, then die as if the power went off
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from cli import cli
cli.main(sys.argv[2:], prog_name="asr")
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write(corpus, reference, tmp_path):
    driver = tmp_path / "kill_in_save.py"
    driver.write_text(KILL_IN_SAVE)
    run = tmp_path / "run"
    proc = spawn([str(driver), "4", *train_args(corpus, run)])
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    partial = list((run / CKPT_DIR).glob(".step-*.tmp"))
    assert len(partial) == 1  # the half-written file is there, under a temporary name
    newest = assert_checkpoints_complete(run)  # and every real checkpoint is complete
    assert 0 < newest < STEPS
    path, ck = load_latest_checkpoint(run)
    assert ck["run_state"]["step"] == newest

    r = run_cli([*train_args(corpus, run), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"resuming from {path}" in r.output
    assert not list(run.rglob(".*.tmp"))  # leftovers of the killed run are cleaned up
    assert_same_weights(run, reference)


def test_ctrl_c_and_random_sigkills_never_lose_the_run(corpus, reference, tmp_path):
    run = tmp_path / "run"
    args = ["-m", "cli", *train_args(corpus, run)]

    # Ctrl-C: the current step finishes, a checkpoint of it is written, exit code 130
    proc = spawn(args)
    assert wait_for(lambda: any((run / CKPT_DIR).glob("step-*.pt")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopping after this step" in err
    stopped = assert_checkpoints_complete(run)
    assert f"interrupted: stopped at step {stopped}; checkpoint " in err
    assert stopped < STEPS

    # SIGKILL at random moments while it checkpoints after every step: 1-3 steps into the resumed
    # run, then a random part of a step later (a fixed sleep could outlast a fast machine's run)
    rng = random.Random(1234)
    for _ in range(2):
        before = assert_checkpoints_complete(run)
        proc = spawn([*args, "--resume"])
        target = before + rng.randint(1, 3)
        started = wait_for(lambda t=target: any(
            int(p.stem.split("-")[1]) >= t for p in (run / CKPT_DIR).glob("step-*.pt")), proc)
        assert started and target < STEPS, "the run ended before it could be killed"
        time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        proc.communicate(timeout=900)
        assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
        assert_checkpoints_complete(run)
        assert load_latest_checkpoint(run)[1] is not None

    r = run_cli([*train_args(corpus, run), "--resume"])
    assert r.exit_code == 0, r.output
    assert_same_weights(run, reference)


def test_sigterm_to_every_process_stops_cleanly(corpus, reference, tmp_path):
    """A scheduler's SIGTERM reaches the main process and its DataLoader workers alike."""
    run = tmp_path / "run"
    args = ["-m", "cli", *train_args(corpus, run), "--num-workers", "1"]
    proc = spawn(args, start_new_session=True)
    assert wait_for(lambda: any((run / CKPT_DIR).glob("step-*.pt")), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "SIGTERM: stopping after this step" in err
    stopped = assert_checkpoints_complete(run)
    assert f"interrupted: stopped at step {stopped}; checkpoint " in err

    r = run_cli([*train_args(corpus, run), "--resume"])
    assert r.exit_code == 0, r.output
    assert_same_weights(run, reference)


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(corpus, reference, tmp_path,
                                                                   monkeypatch):
    run = tmp_path / "run"
    real_save, calls, failed = torch.save, [], {}

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the disk fills up half way through the fourth checkpoint
            [tmp] = (run / CKPT_DIR).glob(".*.tmp")  # the file being written, under a temporary name
            failed["target"] = tmp.name[1:].rsplit(".", 2)[0]  # .NAME.XXXX.tmp -> NAME
            failed["before"] = {p.name: p.read_bytes() for p in (run / CKPT_DIR).iterdir() if p != tmp}
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    r = run_cli(train_args(corpus, run))
    assert r.exit_code == 1
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert "No space left on device" in line and failed["target"] in line and "--resume" in line
    assert re.search(r"the last complete checkpoint \(step-\d{8}\.pt\) is kept", line), line
    # the checkpoints written before are all there, byte for byte, and no temporary file is left
    after = {p.name: p.read_bytes() for p in (run / CKPT_DIR).iterdir()}
    assert after == failed["before"] and after
    assert assert_checkpoints_complete(run) > 0

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    r = run_cli([*train_args(corpus, run), "--resume"])
    assert r.exit_code == 0, r.output
    assert_same_weights(run, reference)


def test_corrupt_newest_checkpoint_and_cut_metrics_line_are_skipped(corpus, reference, tmp_path):
    run = tmp_path / "run"
    r = run_cli(train_args(corpus, run))
    assert r.exit_code == 0, r.output
    newest = run / CKPT_DIR / f"step-{STEPS:08d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a bad disk, or a copy cut short
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 99, "lo')  # a line cut off by a crash
    r = run_cli([*train_args(corpus, run), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"skipping unreadable checkpoint {newest}" in r.output
    assert f"resuming from {run / CKPT_DIR / f'step-{STEPS - 1:08d}.pt'}" in r.output
    assert_same_weights(run, reference)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (run / "plot.png").exists()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_audio_that_breaks_during_training_stops_with_the_file_named(corpus, tmp_path, num_workers):
    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    victim = next(data.rglob("9301-1-0003.flac"))
    cfg = TrainConfig(train=(str(data),), dev=(), out=str(tmp_path / "run"), hidden_size=32,
                      num_layers=1, conv_channels=4, max_steps=12, batch_seconds=8.0,
                      num_workers=num_workers, save_every=100, stats_utterances=50)

    def break_file(step):
        if step == 1:
            victim.write_bytes(b"not audio any more")

    with pytest.raises(AudioError) as e:
        train(cfg, on_step=break_file)
    message = str(e.value)
    assert "\n" not in message and str(victim) in message and "--resume" in message
    # the steps trained so far are kept
    assert assert_checkpoints_complete(tmp_path / "run") >= 1


def test_a_run_that_cannot_write_its_first_checkpoint_does_not_promise_one(corpus, tmp_path, monkeypatch):
    def save(obj, f, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(torch, "save", save)
    r = run_cli(train_args(corpus, tmp_path / "run"))
    assert r.exit_code == 1
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert "Read-only file system" in line and line.endswith("no checkpoint was written")
