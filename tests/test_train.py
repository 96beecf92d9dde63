"""Training: exact resume, run outputs (metrics, plot, checkpoints, best model), DDP under torchrun.

Tiny models (hidden 32) on a few short real recordings from tests/fixtures, a few steps each.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CORPUS, make_subcorpus

from asr.audio import load_audio
from asr.checkpoint import read_checkpoint
from asr.data import scan_corpus
from asr.features import FeatureConfig, FeatureStats, log_mel
from asr.model import output_lengths
from asr.text import Vocab
from asr.train import (
    CKPT_DIR,
    TrainConfig,
    get_lr,
    load_teacher,
    run_subsampling,
    selection_score,
    train,
)
from cli import cli

TRAIN_IDS = ("9301-1-0001", "9301-1-0002", "9301-1-0003", "9301-1-0004", "9301-1-0005",
             "9302-1-0000", "9300-1-0088")
DEV_IDS = ("9300-1-0093", "9301-1-0004")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return (make_subcorpus(CORPUS / "sphinx", root / "train", TRAIN_IDS),
            make_subcorpus(CORPUS / "sphinx", root / "dev", DEV_IDS))


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    """Same thread count everywhere, so runs compare bit for bit; a private manifest cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ASR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def tiny_config(corpora, out: Path, **kw) -> TrainConfig:
    train_dir, dev_dir = corpora
    base = dict(train=(str(train_dir),), dev=(str(dev_dir),), out=str(out), hidden_size=32,
                num_layers=2, conv_channels=4, dropout=0.2, max_steps=7, batch_seconds=8.0,
                warmup_steps=2, num_workers=0, save_every=2, log_every=1, eval_every=3,
                keep_last=2, stats_utterances=50)  # augmentation stays on (the default)
    return TrainConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path, step: int) -> dict:
    return read_checkpoint(run / CKPT_DIR / f"step-{step:08d}.pt")["state_dict"]


@pytest.fixture(scope="module")
def reference_run(corpora, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    train(tiny_config(corpora, run))
    return run


@pytest.mark.parametrize("num_workers", [0, 1])
def test_interrupted_and_resumed_run_equals_uninterrupted(corpora, reference_run, tmp_path,
                                                          num_workers):
    cfg = tiny_config(corpora, tmp_path / "run", num_workers=num_workers)

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    saved = sorted(p.name for p in (tmp_path / "run" / CKPT_DIR).glob("step-*.pt"))
    assert saved[-1] < "step-00000005.pt"  # steps after the last checkpoint are trained again
    train(cfg, resume=True)

    ref, got = final_weights(reference_run, 7), final_weights(tmp_path / "run", 7)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    # the same batches, augmentation and dropout: the per-step losses and dev scores match too
    ref_rows = {(r["event"], r["step"]): r for r in metrics(reference_run)}
    got_rows = {(r["event"], r["step"]): r for r in metrics(tmp_path / "run")}
    assert ref_rows.keys() == got_rows.keys()  # metrics.jsonl rewound to the checkpoint: no repeats
    for key, r in ref_rows.items():
        field = "loss" if key[0] == "train" else "dev_wer"
        assert got_rows[key][field] == pytest.approx(r[field], rel=1e-5), key


def test_best_model_selection_never_prefers_an_all_blank_model():
    blank = selection_score(1.0, 1.0)  # outputs nothing: every word deleted, every letter too
    babbling = selection_score(1.3, 0.5)  # more word errors than words, but half the letters right
    assert babbling < blank
    assert selection_score(0.95, 0.6) < babbling  # once words come right, WER decides
    assert selection_score(0.40, 0.30) < selection_score(0.45, 0.20)


def test_run_folder_holds_metrics_plot_checkpoints_and_best(corpora, reference_run):
    rows = metrics(reference_run)
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 8))  # log_every=1
    for r in train_rows:
        assert r["loss"] > 0 and math.isfinite(r["loss"]) and r["audio_s_per_s"] > 0
        assert r["lr"] == pytest.approx(get_lr(r["step"] - 1, 7, tiny_config(corpora, reference_run)))
    dev_rows = [r for r in rows if r["event"] == "dev"]
    epochs_done = {r["epoch"] for r in dev_rows}
    assert {3, 6} <= {r["step"] for r in dev_rows}  # eval_every=3
    assert 7 in {r["step"] for r in dev_rows}  # and the end of the run
    assert len(epochs_done) >= 2  # epoch ends evaluate too
    assert (reference_run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # keep the last 2 step checkpoints, plus best.pt = the best dev evaluation (selection_score)
    assert sorted(p.name for p in (reference_run / CKPT_DIR).glob("*")) == \
        ["step-00000006.pt", "step-00000007.pt"]
    best = read_checkpoint(reference_run / "best.pt")
    chosen = min(dev_rows, key=lambda r: selection_score(r["dev_wer"], r["dev_cer"]))
    assert (best["meta"]["dev_wer"], best["meta"]["dev_cer"]) == (chosen["dev_wer"], chosen["dev_cer"])
    assert "optimizer" not in best

    # global feature statistics of the training audio, stored in every checkpoint
    utts, _ = scan_corpus(corpora[0], Vocab())
    frames = torch.cat([log_mel(load_audio(u.path)) for u in utts]).double()
    for ck in [best, read_checkpoint(reference_run / CKPT_DIR / "step-00000007.pt")]:
        torch.testing.assert_close(ck["feature_stats"]["mean"].double(), frames.mean(0),
                                   rtol=0, atol=1e-3)
        torch.testing.assert_close(ck["feature_stats"]["std"].double(), frames.std(0, correction=0),
                                   rtol=0, atol=1e-3)


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(train=("x",), dev=(), out="x", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [get_lr(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert get_lr(100, 100, cfg) == pytest.approx(1e-4)


def test_cli_refuses_to_start_over_an_existing_run(corpora, reference_run):
    """A new run pointed at a finished one changes none of its files (checkpoints, metrics, plot)."""
    before = {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()}
    assert any(p.suffix == ".pt" for p in before) and any(p.name == "metrics.jsonl" for p in before)
    r = CliRunner().invoke(cli, ["train", "--train", str(corpora[0]), "--out", str(reference_run),
                                 "--max-steps", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().startswith("Error: ") and "--resume" in r.stderr
    assert {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf"])
def test_cli_refuses_a_corpus_weight_that_is_not_above_zero(corpora, tmp_path, weight):
    """A weight of 0 once gave an epoch of no batches and a run that never ended."""
    r = CliRunner().invoke(cli, ["train", "--train", f"{corpora[0]}:{weight}", "--out",
                                 str(tmp_path / "run"), "--max-steps", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == (f"Error: --train {corpora[0]}:{weight}: the weight (repeats per "
                                f"epoch) must be a number above 0")
    assert not (tmp_path / "run").exists()


def test_weights_that_leave_an_epoch_empty_are_refused(corpora, tmp_path):
    with pytest.raises(ValueError, match=r"the --train weights give 0.07 utterances per epoch"):
        train(tiny_config(corpora, tmp_path / "run", train=(f"{corpora[0]}:0.01",)))


def test_resume_passes_over_an_export_written_onto_the_last_checkpoint(corpora, reference_run, tmp_path):
    """An inference-only file where the newest step checkpoint was (an export that was let
    overwrite it, a copy gone wrong) is skipped with a warning: the run resumes from the step
    before and ends exactly as the uninterrupted run did."""
    import shutil

    from asr.train import export_model

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    last = run / CKPT_DIR / "step-00000007.pt"
    export_model(str(run / CKPT_DIR / "step-00000006.pt"), str(tmp_path / "exported.pt"), half=False)
    os.replace(tmp_path / "exported.pt", last)
    r = CliRunner().invoke(cli, ["train", "--train", str(corpora[0]), "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"warning: skipping checkpoint {last}: it holds no training state" in r.stderr
    assert "resuming from" in r.output and "(step 6," in r.output
    for k, v in final_weights(reference_run, 7).items():
        assert torch.equal(final_weights(run, 7)[k], v), k


def _with_truncated_file(corpora, tmp_path) -> Path:
    import shutil

    root = tmp_path / "train"
    shutil.copytree(corpora[0], root)
    damaged = next(root.rglob("9301-1-0003.flac"))
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) * 3 // 5])  # the header (and its length) intact
    return damaged


def test_audio_damaged_past_its_header_stops_training_or_is_skipped(corpora, reference_run, tmp_path,
                                                                     capsys):
    from asr.audio import AudioError

    damaged = _with_truncated_file(corpora, tmp_path)
    root = tmp_path / "train"
    cfg = tiny_config(corpora, tmp_path / "run", train=(str(root),), max_steps=0, epochs=1,
                      eval_every=0, num_workers=0)
    with pytest.raises(AudioError, match=rf"^{damaged}: cannot decode audio .* \(while measuring "
                       rf"the feature statistics; --skip-bad skips such files\)$"):
        train(cfg)
    # from a trained model (its feature statistics): the damage is met in a batch
    warm = replace(cfg, out=str(tmp_path / "warm"),
                   init_from=str(reference_run / CKPT_DIR / "step-00000007.pt"))
    with pytest.raises(AudioError, match=rf"^training stopped: {damaged}: cannot decode audio .*; fix "
                       rf"or remove the file \(or add --skip-bad\), then continue with --resume$"):
        train(warm)
    capsys.readouterr()
    best = train(replace(cfg, out=str(tmp_path / "skipping"), skip_bad=True))
    assert best is not None and best.exists()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "(--skip-bad)" in ln]
    assert len(warnings) == 1 and "9301-1-0003" in warnings[0] and str(damaged) in warnings[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def test_skip_bad_covers_the_dev_set_too(corpora, tmp_path, capsys):
    import shutil

    dev = tmp_path / "dev"
    shutil.copytree(corpora[1], dev)
    _truncate(next(dev.rglob("9300-1-0093.flac")))
    run = tmp_path / "run"
    train(tiny_config(corpora, run, dev=(str(dev),), skip_bad=True, max_steps=6))
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "(--skip-bad)" in ln]
    assert len(warnings) == 1 and "dev utterance 9300-1-0093 left out" in warnings[0]
    assert [m["step"] for m in metrics(run) if m["event"] == "dev"] == [3, 6]


def test_skip_bad_with_nothing_decodable_stops_in_one_line(corpora, reference_run, tmp_path):
    import shutil

    from asr.audio import AudioError

    root = tmp_path / "train"
    shutil.copytree(corpora[0], root)
    for f in root.rglob("*.flac"):
        _truncate(f)
    cfg = tiny_config(corpora, tmp_path / "fresh", train=(str(root),), skip_bad=True)
    with pytest.raises(AudioError, match=r"^none of the 7 utterances sampled for the feature "
                       r"statistics could be decoded"):
        train(cfg)
    warm = replace(cfg, out=str(tmp_path / "warm"), init_from=str(reference_run / CKPT_DIR / "step-00000007.pt"))
    with pytest.raises(AudioError, match=r"training stopped: no batch of epoch 0 could be decoded "
                       r"\(--skip-bad left every utterance out\)"):
        train(warm)


# ----------------------------------------------------------------------------- several processes

DDP_DRIVER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from cli import cli
from asr.train import TrainConfig, train

dist.init_process_group("gloo")  # kept across the two runs below (train() leaves it alone)
args, ref, run = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
saved = json.loads((Path(ref) / "train_config.json").read_text())  # the reference's very recipe
cfg = TrainConfig(**{**saved, "out": run, "train": tuple(saved["train"]), "dev": tuple(saved["dev"])})
def interrupt(step):
    if step == 3:
        raise KeyboardInterrupt
try:
    train(cfg, on_step=interrupt)
except KeyboardInterrupt:
    pass
cli.main(["train", *args, "--out", run, "--resume"], standalone_mode=False)
dist.destroy_process_group()
"""


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *map(str, args)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_train_in_step_and_share_each_epoch(tmp_path, corpora):
    """`asr train` under torchrun with 2 CPU processes (gloo): identical weights on both ranks, each
    epoch's utterances split between them exactly once, rank 0 alone writing; and a run
    interrupted in the middle resumes to the same weights."""
    args = ["--train", corpora[0], "--dev", corpora[1], "--hidden-size", "32",
            "--num-layers", "2", "--conv-channels", "4", "--dropout", "0.2", "--epochs", "2",
            "--batch-seconds", "5", "--warmup-steps", "2", "--num-workers", "0", "--save-every", "2",
            "--log-every", "1", "--threads", "1", "--debug-ranks"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    out = torchrun("-m", "cli", "train", *args, "--out", ref, cwd=tmp_path).stdout
    assert out.count("train: 7 utterances") == 1  # rank 0 alone prints
    assert out.count("model: ") == 1

    utts = {u.id for u in scan_corpus(corpora[0], Vocab())[0]}
    ranks = [json.loads((ref / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP keeps the replicas identical
    assert ranks[0]["step"] == ranks[1]["step"] > 3
    seen = collections.Counter(tuple(x) for r in ranks for x in r["seen"])
    assert set(seen.values()) == {1}  # no utterance twice in an epoch, across both ranks
    for epoch in (0, 1):
        assert {uid for e, uid in seen if e == epoch} == utts  # and none left out
    steps = [r["step"] for r in metrics(ref) if r["event"] == "train"]
    assert steps == list(range(1, ranks[0]["step"] + 1))  # one writer: no duplicated rows

    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    torchrun(driver, json.dumps([str(a) for a in args]), ref, run, cwd=tmp_path)
    resumed = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert resumed[0]["params"] == resumed[1]["params"]
    for k, v in ranks[0]["params"].items():
        assert resumed[0]["params"][k] == pytest.approx(v, abs=1e-6), k


# ----------------------------------------------------------------------------- fine-tuning


def test_init_from_starts_a_new_recipe_from_a_trained_model(overfit_corpus, overfit_models, tmp_path):
    """--init-from: the new run begins with the checkpoint's weights and feature statistics (here:
    a model that knows the corpus keeps knowing it after a step at a tiny learning rate, where a
    fresh model knows nothing), under its own settings; a model of another shape is refused."""
    from asr.checkpoint import load_model
    from asr.evaluate import evaluate_utterances

    src = read_checkpoint(overfit_models["bigru"])
    args = ["train", "--train", str(overfit_corpus), "--hidden-size", "128", "--num-layers", "2",
            "--conv-channels", "16", "--max-steps", "1", "--lr", "1e-9", "--warmup-steps", "1",
            "--augment", "speed", "--num-workers", "0", "--batch-seconds", "40"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "ft"), "--init-from",
                                 str(overfit_models["bigru"])])
    assert r.exit_code == 0, r.output
    assert "initialised from" in r.output
    models = {"ft": Path(r.output.split("model: ")[-1].strip())}
    tuned = read_checkpoint(models["ft"])
    torch.testing.assert_close(tuned["feature_stats"], src["feature_stats"], rtol=0, atol=0)
    cfg = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    assert cfg["augment_kinds"] == "speed" and cfg["init_from"] == str(overfit_models["bigru"])
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "fresh")])
    assert r.exit_code == 0, r.output
    models["fresh"] = Path(r.output.split("model: ")[-1].strip())
    utts, _ = scan_corpus(overfit_corpus, Vocab())

    def cer(run: str) -> float:
        return evaluate_utterances(load_model(models[run]), utts).counts.cer

    tuned_cer, fresh_cer = cer("ft"), cer("fresh")
    assert tuned_cer < 0.1 and fresh_cer > 0.5

    r = CliRunner().invoke(cli, [*args[:3], "--hidden-size", "64", "--out", str(tmp_path / "bad"),
                                 "--init-from", str(overfit_models["bigru"])])
    assert r.exit_code == 1 and "hidden_size 128 (not 64)" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad" / "checkpoints").exists()
    r = CliRunner().invoke(cli, [*args, "--augment", "speed,echo", "--out", str(tmp_path / "bad2")])
    assert r.exit_code == 2 and "'echo'" in r.output


def test_init_from_can_halve_the_output_frame(overfit_corpus, overfit_models, tmp_path):
    """--init-from a 40 ms model with --subsampling 2: the same weights, now run at 20 ms frames
    (twice the output frames); the checkpoint records it, transcription uses 20 ms times, and
    a further run from it keeps 20 ms unless told otherwise."""
    from asr.audio import load_audio
    from asr.checkpoint import load_model
    from asr.features import log_mel
    from asr.transcribe import transcribe_file

    src = read_checkpoint(overfit_models["bigru"])
    assert src["model_config"].get("subsampling", 4) == 4  # checkpoints from before the option: 4
    r = CliRunner().invoke(cli, [
        "train", "--train", str(overfit_corpus), "--hidden-size", "128", "--num-layers", "2",
        "--conv-channels", "16", "--max-steps", "1", "--lr", "1e-9", "--warmup-steps", "1",
        "--num-workers", "0", "--batch-seconds", "40", "--subsampling", "2", "--out", str(tmp_path / "ft"),
        "--init-from", str(overfit_models["bigru"])])
    assert r.exit_code == 0, r.output
    path = Path(r.output.split("model: ")[-1].strip())
    tuned = read_checkpoint(path)
    assert tuned["model_config"] == {**src["model_config"], "subsampling": 2, "dropout": 0.15}
    for k, v in src["state_dict"].items():
        torch.testing.assert_close(tuned["state_dict"][k].float(), v.float(), atol=1e-5, rtol=0)
    loaded = load_model(path)
    assert loaded.frame_seconds == pytest.approx(0.02)
    utt = scan_corpus(overfit_corpus, Vocab())[0][0]
    feats = log_mel(load_audio(utt.path), loaded.feature_config)
    with torch.no_grad():
        _, n_out = loaded.model(feats[None], torch.tensor([feats.shape[0]]))
    assert n_out.item() == -(-feats.shape[0] // 2)
    words = transcribe_file(loaded, utt.path).words
    assert words and words[-1].end <= utt.duration + 0.02

    # without --subsampling, a run from that model keeps its 20 ms frames (no silent change back)
    r = CliRunner().invoke(cli, [
        "train", "--train", str(overfit_corpus), "--hidden-size", "128", "--num-layers", "2",
        "--conv-channels", "16", "--max-steps", "1", "--num-workers", "0", "--batch-seconds", "40",
        "--out", str(tmp_path / "again"), "--init-from", str(path)])
    assert r.exit_code == 0, r.output
    assert read_checkpoint(Path(r.output.split("model: ")[-1].strip()))["model_config"]["subsampling"] == 2


def test_run_subsampling_prefers_the_option_then_the_source_model_then_40_ms():
    """The rate a run trains at (and a --teacher must share): an explicit --subsampling wins, an
    unset one follows the checkpoint the run starts from, and a fresh run gets 4 (40 ms)."""
    cfg = TrainConfig(train=("x",), dev=(), out="x")
    twenty_ms = {"model_config": {"subsampling": 2}}
    old = {"model_config": {}}  # written before the option existed: 4
    assert run_subsampling(cfg, None) == 4
    assert run_subsampling(cfg, twenty_ms) == 2
    assert run_subsampling(cfg, old) == 4
    assert run_subsampling(replace(cfg, subsampling=4), twenty_ms) == 4
    assert run_subsampling(replace(cfg, subsampling=2), None) == 2


# ----------------------------------------------------------------------------- distillation


def _posteriors(model_path: Path, utts, stats=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feats, lengths, log-probs) of a model over the utterances as one padded batch; the features
    are normalised with `stats` (default: the model's own)."""
    from asr.checkpoint import load_model
    from asr.data import collate

    lm = load_model(model_path)
    stats = stats or lm.stats
    items = [(stats.normalize(log_mel(load_audio(u.path))), torch.zeros(1, dtype=torch.long), u.id)
             for u in utts]
    batch = collate(items)
    with torch.no_grad():
        lp, _ = lm.model(batch["feats"], batch["lengths"])
    return batch["feats"], batch["lengths"], lp


def test_distillation_loss_compares_the_student_with_the_delayed_teacher(overfit_corpus, overfit_models):
    """KL(teacher[t - delay] || student[t]) over the valid frames: zero for the teacher itself, zero
    for a copy of it that emits `delay` frames later (as a causal student does), positive otherwise."""
    utts, _ = scan_corpus(overfit_corpus, Vocab())
    teacher_path = overfit_models["bigru"]
    feats, lengths, lp = _posteriors(teacher_path, utts)
    stats = read_checkpoint(teacher_path)["feature_stats"]
    cfg = TrainConfig(train=("x",), dev=(), out="x", teacher=str(teacher_path))
    cfg = replace(cfg, subsampling=run_subsampling(cfg, None))  # as train() resolves it: 40 ms
    out_len = output_lengths(lengths)
    teacher = load_teacher(cfg, FeatureConfig(), Vocab(), FeatureStats.from_dict(stats))
    assert teacher.loss(feats, lengths, lp, out_len) == pytest.approx(0.0, abs=1e-3)
    late = torch.cat([lp[:, :1].expand(-1, 3, -1), lp[:, :-3]], dim=1)  # emits 3 frames later
    assert teacher.loss(feats, lengths, late, out_len) > 20.0
    teacher.delay = 3
    assert teacher.loss(feats, lengths, late, out_len) == pytest.approx(0.0, abs=1e-3)
    # frames beyond an utterance's length do not count
    garbage = late.clone()
    for b, n in enumerate(out_len.tolist()):
        garbage[b, n:] = torch.log_softmax(torch.randn_like(garbage[b, n:]), -1)
    assert teacher.loss(feats, lengths, garbage, out_len) == pytest.approx(0.0, abs=1e-3)


def test_teacher_pulls_a_new_student_towards_its_posteriors(overfit_corpus, overfit_models, tmp_path):
    """`asr train --teacher`: the same fresh streaming student, the same batches, with and without
    the BiGRU teacher; the distilled one ends much closer to the teacher's posteriors. A teacher
    that is not a checkpoint is a one-line error before anything is written."""
    args = ["train", "--train", str(overfit_corpus), "--arch", "gru", "--hidden-size", "64",
            "--num-layers", "1", "--conv-channels", "8", "--dropout", "0", "--max-steps", "40",
            "--lr", "3e-3", "--warmup-steps", "5", "--no-augment", "--num-workers", "0",
            "--batch-seconds", "40"]
    utts, _ = scan_corpus(overfit_corpus, Vocab())
    teacher_path = overfit_models["bigru"]
    kl = {}
    for name, extra in (("plain", []), ("distilled", ["--teacher", str(teacher_path),
                                                      "--distill-weight", "10"])):
        r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        assert ("distilling from" in r.output) == (name == "distilled")
        student = Path(r.output.split("model: ")[-1].strip())
        s_stats = FeatureStats.from_dict(read_checkpoint(student)["feature_stats"])
        _, lengths, s_lp = _posteriors(student, utts)
        _, _, t_lp = _posteriors(teacher_path, utts, s_stats)
        valid = torch.arange(s_lp.shape[1])[None, :] < output_lengths(lengths)[:, None]
        kl[name] = float(((t_lp.exp() * (t_lp - s_lp)).sum(-1) * valid).sum() / valid.sum())
    saved = json.loads((tmp_path / "distilled" / "train_config.json").read_text())
    assert saved["teacher"] == str(teacher_path) and saved["distill_weight"] == 10.0
    print("mean KL per frame to the teacher:", kl)
    assert kl["distilled"] < 0.75 * kl["plain"], kl

    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bad"), "--teacher",
                                 str(overfit_corpus / "missing.pt")])
    assert r.exit_code == 1 and "missing.pt" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad" / "checkpoints").exists()
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bad"), "--teacher", str(teacher_path),
                                 "--subsampling", "2"])  # its frames would not line up with the student's
    assert r.exit_code == 1 and "subsampling 4 (not 2)" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad" / "checkpoints").exists()
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bad"), "--distill-delay", "3"])
    assert r.exit_code == 2 and "need --teacher" in r.output and not (tmp_path / "bad").exists()


def test_cmn_window_trains_on_the_features_it_transcribes_with_and_is_kept(overfit_corpus, overfit_models,
                                                                           tmp_path):
    """--cmn-window (and its --cmn-floor-gate): the checkpoint records the running mean, so loading
    the model applies it; the training batches were made with the very features inference computes;
    a run --init-from that model keeps the settings unless told otherwise; distilling with it, or a
    gate without a running mean, is a one-line error."""
    from asr.checkpoint import load_model
    from asr.data import SpeechDataset
    from asr.features import normalize_features

    args = ["train", "--train", str(overfit_corpus), "--hidden-size", "128", "--num-layers", "2",
            "--conv-channels", "16", "--max-steps", "1", "--lr", "1e-9", "--warmup-steps", "1",
            "--num-workers", "0", "--batch-seconds", "40"]

    def run(name: str, *extra: str) -> Path:
        r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        return Path(r.output.split("model: ")[-1].strip())

    path = run("cmn", "--cmn-window", "500", "--cmn-floor-gate", "0.5", "--init-from", str(overfit_models["bigru"]))
    lm = load_model(path)
    assert lm.feature_config == FeatureConfig(cmn_window=500, cmn_floor_gate=0.5)
    utts, _ = scan_corpus(overfit_corpus, Vocab())
    wave = load_audio(utts[0].path)
    feats = lm.features(wave)
    torch.testing.assert_close(feats, normalize_features(log_mel(wave), lm.feature_config, lm.stats))
    assert not torch.allclose(feats, lm.stats.normalize(log_mel(wave)), atol=0.05)
    train_feats = SpeechDataset(utts, lm.vocab, lm.feature_config, lm.stats).features(0)
    assert torch.equal(train_feats, feats)

    assert load_model(run("kept", "--init-from", str(path))).feature_config == lm.feature_config
    assert load_model(run("off", "--init-from", str(path), "--cmn-window", "0")).feature_config == FeatureConfig()
    assert load_model(run("fresh")).feature_config == FeatureConfig()

    r = CliRunner().invoke(cli, [*args, "--cmn-floor-gate", "0.5", "--out", str(tmp_path / "nogate")])
    assert r.exit_code == 1 and "needs --cmn-window" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "nogate" / "checkpoints").exists()

    r = CliRunner().invoke(cli, [*args, "--arch", "gru", "--cmn-window", "500", "--out", str(tmp_path / "bad"),
                                 "--teacher", str(overfit_models["bigru"])])
    assert r.exit_code == 1 and "--cmn-window" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_init_from_or_teacher_with_unusable_feature_settings_is_one_line(overfit_corpus, overfit_models, tmp_path):
    """A checkpoint whose feature settings cannot be read (an unknown key, a negative running-mean
    window) is refused in one line when named by --init-from or --teacher, before anything is written."""
    args = ["train", "--train", str(overfit_corpus), "--hidden-size", "128", "--num-layers", "2",
            "--conv-channels", "16", "--max-steps", "1", "--num-workers", "0", "--batch-seconds", "40"]
    for i, bad in enumerate(({"window_fn": "hamming"}, {"cmn_window": -5})):
        ck = read_checkpoint(overfit_models["bigru"])
        ck["feature_config"] = {**ck["feature_config"], **bad}
        path = tmp_path / f"bad{i}.pt"
        torch.save(ck, path)
        for opt in ("--init-from", "--teacher"):
            out = tmp_path / f"run{i}{opt}"
            r = CliRunner().invoke(cli, [*args, "--out", str(out), opt, str(path)])
            assert r.exit_code == 1, r.output
            assert "unusable feature settings" in r.output and "Traceback" not in r.output
            assert not (out / "checkpoints").exists()
