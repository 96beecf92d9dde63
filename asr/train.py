"""CTC training: one process, or several under torchrun (DistributedDataParallel).

The loop reads top to bottom: batches from DurationBatchSampler (order a pure function of seed and
epoch), CTC loss, gradient clipping, AdamW with a pure `get_lr(step)`, periodic dev WER, atomic
checkpoints that hold everything `--resume` needs to continue exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    LoadedModel,
    atomic_save,
    make_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
)
from .data import (
    AugmentConfig,
    DurationBatchSampler,
    SpeechDataset,
    collate,
    feature_stats,
    load_corpora,
)
from .evaluate import decode_utterances, error_counts
from .features import FeatureConfig, FeatureStats
from .model import CTCModel, ModelConfig, count_parameters
from .text import Vocab

CKPT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    train: tuple[str, ...]  # corpus folders, each optionally "PATH:WEIGHT" (repeats per epoch)
    dev: tuple[str, ...]  # corpus folders for dev WER
    out: str  # run folder
    arch: str = "bigru"  # bigru (offline) | gru (unidirectional, streaming)
    cell: str = "gru"  # recurrent cell: gru | lstm | rnn
    hidden_size: int = 256  # units per direction
    num_layers: int = 3  # recurrent layers
    conv_channels: int = 32  # subsampler channels
    dropout: float = 0.15  # recurrent/classifier dropout
    epochs: int = 10  # passes over the (weighted) training data, unless max_steps is set
    max_steps: int = 0  # stop after this many optimizer steps (0: use epochs)
    batch_seconds: float = 240.0  # padded audio seconds per batch (per rank)
    lr: float = 1.5e-3  # peak learning rate
    warmup_steps: int = 300  # linear warm-up
    min_lr_ratio: float = 0.05  # cosine decay floor, as a share of lr
    weight_decay: float = 0.01  # AdamW
    clip_norm: float = 5.0  # gradient norm clip
    seed: int = 0  # data order, augmentation and initialisation
    augment: bool = True  # speed/gain/noise/SpecAugment on training batches
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 1  # DataLoader worker processes
    log_every: int = 20  # steps between metrics lines
    eval_every: int = 0  # steps between dev evaluations (0: at each epoch end only)
    save_every: int = 500  # steps between checkpoints (and at each epoch end)
    keep_last: int = 3  # step checkpoints kept besides best.pt
    stats_utterances: int = 1000  # utterances sampled for the global feature statistics
    skip_bad: bool = False  # skip (and count) corpus problems instead of stopping
    debug_ranks: bool = False  # write each rank's seen ids and weight checksum (tests)


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def parse_corpus_arg(arg: str) -> tuple[str, float]:
    """"PATH" or "PATH:WEIGHT" -> (path, weight)."""
    path, sep, w = arg.rpartition(":")
    if sep and path and not os.path.exists(arg):
        try:
            return path, float(w)
        except ValueError:
            pass
    return arg, 1.0


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint that reads back completely (corrupt files are skipped)."""
    for p in sorted((run_dir / CKPT_DIR).glob("step-*.pt"), reverse=True):
        try:
            read_checkpoint(p)
            return p
        except CheckpointError as e:
            print(f"warning: skipping unreadable checkpoint {e}")
    return None


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on (this rank)
    best_wer: float = float("inf")
    history: list[dict] = field(default_factory=list)  # dev evaluations


def train(cfg: TrainConfig, resume: bool = False,
          on_step: Callable[[int], None] | None = None) -> Path:
    """Train a model; returns the path of the best checkpoint (or the last one without dev)."""
    out = Path(cfg.out)
    device = _pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = _setup_dist(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = dist_info.main
    vocab = Vocab()
    fcfg = FeatureConfig()

    state = RunState()
    resume_ckpt = None
    if resume:
        last = latest_checkpoint(out)
        if last is None:
            raise ValueError(f"--resume: no complete checkpoint in {out / CKPT_DIR}")
        resume_ckpt = read_checkpoint(last)
        saved = resume_ckpt["train_config"]
        # a resumed run keeps its recipe; only where it runs may change
        cfg = replace(TrainConfig(**{**saved, "train": tuple(saved["train"]), "dev": tuple(saved["dev"])}),
                      out=cfg.out, device=cfg.device, num_workers=cfg.num_workers)
        state = RunState(**resume_ckpt["run_state"])
    elif (out / CKPT_DIR).exists() and any((out / CKPT_DIR).glob("step-*.pt")):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue it, "
                         f"or choose a new --out folder")

    corpora = [parse_corpus_arg(a) for a in cfg.train]
    train_utts, weights = [], []
    skipped = 0
    for path, w in corpora:
        u, s = load_corpora([path], vocab, cfg.skip_bad)
        train_utts += u
        weights += [w] * len(u)
        skipped += s
    dev_utts = []
    if cfg.dev:
        dev_utts, s = load_corpora(list(cfg.dev), vocab, cfg.skip_bad)
        skipped += s
    if main and skipped:
        print(f"skipped {skipped} corpus problem(s) (--skip-bad)")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if resume_ckpt is not None:
        stats = FeatureStats.from_dict(resume_ckpt["feature_stats"])
    else:
        probe = SpeechDataset(train_utts, vocab, fcfg, None)
        stats = feature_stats(probe, cfg.stats_utterances, cfg.seed)
    mcfg = ModelConfig(n_mels=fcfg.n_mels, vocab_size=len(vocab), bidirectional=cfg.arch == "bigru",
                       cell=cfg.cell, conv_channels=cfg.conv_channels, hidden_size=cfg.hidden_size,
                       num_layers=cfg.num_layers, dropout=cfg.dropout)
    model = CTCModel(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        if "scaler" in resume_ckpt and device.type == "cuda":
            scaler.load_state_dict(resume_ckpt["scaler"])
        torch.set_rng_state(resume_ckpt["rng"]["torch"])
        if device.type == "cuda" and resume_ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume_ckpt["rng"]["cuda"])
    ddp_model = model
    if dist_info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    ds = SpeechDataset(train_utts, vocab, fcfg, stats, AugmentConfig() if cfg.augment else None)
    sampler = DurationBatchSampler([u.duration for u in train_utts], cfg.batch_seconds, cfg.seed,
                                   weights, dist_info.rank, dist_info.world_size, augment=cfg.augment)
    steps_per_epoch = len(sampler.rank_batches(0))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if main:
        out.mkdir(parents=True, exist_ok=True)
        hours = sum(u.duration for u in train_utts) / 3600
        print(f"train: {len(train_utts)} utterances, {hours:.2f} h; dev: {len(dev_utts)}; "
              f"model {cfg.arch}/{cfg.cell} {count_parameters(model) / 1e6:.2f} M parameters; "
              f"{steps_per_epoch} steps/epoch x {dist_info.world_size} rank(s); {total_steps} steps; "
              f"device {device}")
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    def checkpoint(tag: str) -> Path:
        extra = {"train_config": asdict(cfg), "run_state": asdict(state), "optimizer": opt.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}
        if device.type == "cuda":
            extra["scaler"] = scaler.state_dict()
        meta = {"step": state.step, "epoch": state.epoch, "best_dev_wer": state.best_wer,
                "train_corpora": list(cfg.train), "dev_corpora": list(cfg.dev),
                "train_hours": round(sum(u.duration for u in train_utts) / 3600, 3),
                "wall_seconds": round(time.time() - t_start + prior_wall, 1)}
        ck = make_checkpoint(model, fcfg, stats, vocab, meta, **extra)
        path = out / CKPT_DIR / f"step-{state.step:08d}.pt"
        atomic_save(ck, path)
        for old in sorted((out / CKPT_DIR).glob("step-*.pt"))[:-cfg.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def evaluate() -> None:
        if not dev_utts:
            return
        lm = LoadedModel(model, fcfg, stats, vocab)
        hyps = decode_utterances(lm, dev_utts)
        ec = error_counts([u.text for u in dev_utts], hyps)
        row = {"step": state.step, "epoch": state.epoch, "dev_wer": ec.wer, "dev_cer": ec.cer}
        state.history.append(row)
        _log(out, {"event": "dev", **row})
        tqdm.write(f"step {state.step} | dev WER {100 * ec.wer:.2f}% | CER {100 * ec.cer:.2f}%")
        if ec.wer < state.best_wer:
            state.best_wer = ec.wer
            best = make_checkpoint(model, fcfg, stats, vocab,
                                   {"step": state.step, "epoch": state.epoch, "dev_wer": ec.wer,
                                    "dev_cer": ec.cer, "train_corpora": list(cfg.train),
                                    "dev_corpora": list(cfg.dev), "train_config": asdict(cfg)})
            atomic_save(best, out / "best.pt")
        plot_run(out)

    prior_wall = resume_ckpt["meta"].get("wall_seconds", 0.0) if resume_ckpt else 0.0
    t_start = time.time()
    seen_ids: list[str] = []
    bar = tqdm(total=total_steps, initial=state.step, disable=not main, dynamic_ncols=True,
               unit="step", smoothing=0.1)
    ddp_model.train()
    window = {"loss": 0.0, "n": 0, "audio_s": 0.0, "t": time.time()}
    try:
        while state.step < total_steps:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
                generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
            for batch in loader:
                lr = get_lr(state.step, total_steps, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                feats = batch["feats"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    log_probs, out_lengths = ddp_model(feats, batch["lengths"])
                loss = F.ctc_loss(log_probs.transpose(0, 1).float(), batch["targets"].to(device),
                                  out_lengths, batch["target_lengths"].to(device), blank=0,
                                  reduction="sum", zero_infinity=True) / feats.shape[0]
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                scaler.step(opt)
                scaler.update()
                state.step += 1
                state.batch_in_epoch += 1
                if cfg.debug_ranks:
                    seen_ids.extend(batch["ids"])
                audio_s = float(batch["lengths"].sum()) / 100.0
                window["loss"] += loss.item()
                window["n"] += 1
                window["audio_s"] += audio_s
                if main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", epoch=state.epoch)
                if main and (state.step % cfg.log_every == 0 or state.step == total_steps):
                    dt = time.time() - window["t"]
                    row = {"event": "train", "step": state.step, "epoch": state.epoch,
                           "loss": window["loss"] / window["n"], "lr": lr,
                           "grad_norm": float(grad_norm),
                           "audio_s_per_s": window["audio_s"] * dist_info.world_size / max(dt, 1e-9),
                           "elapsed_s": round(time.time() - t_start + prior_wall, 1)}
                    _log(out, row)
                    window = {"loss": 0.0, "n": 0, "audio_s": 0.0, "t": time.time()}
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}",
                                    audio=f"{row['audio_s_per_s']:.0f}x", epoch=state.epoch)
                if main and cfg.eval_every and state.step % cfg.eval_every == 0:
                    evaluate()
                    ddp_model.train()
                if main and state.step % cfg.save_every == 0:
                    checkpoint("step")
                if on_step is not None:
                    on_step(state.step)
                if state.step >= total_steps:
                    break
            else:
                # the epoch ran out: evaluate, checkpoint, move on
                state.epoch += 1
                state.batch_in_epoch = 0
                if main:
                    evaluate()
                    ddp_model.train()
                    checkpoint("epoch")
                continue
            break
    finally:
        bar.close()
    if main:
        if not state.history or state.history[-1]["step"] != state.step:
            evaluate()
        last = checkpoint("final")
    if cfg.debug_ranks:
        digest = sum(float(p.double().sum()) for p in model.parameters())
        (out / "ranks").mkdir(parents=True, exist_ok=True)
        (out / "ranks" / f"rank{dist_info.rank}.json").write_text(
            json.dumps({"ids": seen_ids, "param_sum": digest,
                        "params": [p.detach().flatten()[:64].tolist() for p in model.parameters()]}))
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if not main:
        return out
    return out / "best.pt" if (out / "best.pt").exists() else last


def _log(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_run(out: Path) -> None:
    """training loss and dev WER/CER against steps -> out/plot.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    tr = [r for r in rows if r["event"] == "train"]
    dev = [r for r in rows if r["event"] == "dev"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr])
    a.set(xlabel="step", ylabel="CTC loss / utterance", title="training loss")
    a.set_yscale("log")
    if dev:
        b.plot([r["step"] for r in dev], [100 * r["dev_wer"] for r in dev], "o-", label="WER")
        b.plot([r["step"] for r in dev], [100 * r["dev_cer"] for r in dev], "s-", label="CER")
        b.legend()
    b.set(xlabel="step", ylabel="%", title="dev error rates")
    fig.tight_layout()
    tmp = out / ".plot.png.tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, out / "plot.png")


def export_model(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True) -> dict:
    """Inference-only copy of a checkpoint (no optimizer), optionally in float16."""
    ck = read_checkpoint(src)
    lm = model_from_checkpoint(ck, str(src))
    meta = dict(ck.get("meta", {}))
    out = make_checkpoint(lm.model, lm.feature_config, lm.stats, lm.vocab, meta, half=half)
    atomic_save(out, dst)
    return meta
