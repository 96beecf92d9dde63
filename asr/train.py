"""CTC training: one process, or several under torchrun (DistributedDataParallel).

The loop reads top to bottom: batches from DurationBatchSampler (order a pure function of seed and
epoch), CTC loss, gradient clipping, AdamW with a pure `get_lr(step)`, periodic dev WER, atomic
checkpoints that hold everything `--resume` needs to continue exactly where the run stopped.

Crash safety: every file is written to a temporary name and renamed into place, so a kill at any
moment leaves the previous checkpoint complete; SIGINT/SIGTERM finish the current step and write a
checkpoint first; a failed write (full disk) stops the run with the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .audio import AudioError
from .checkpoint import (
    CheckpointError,
    LoadedModel,
    atomic_save,
    checkpoint_feature_config,
    make_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
)
from .data import (
    CorpusError,
    CorpusProblem,
    DurationBatchSampler,
    SpeechDataset,
    augment_config,
    check_problems,
    collate,
    feature_stats,
    parse_augment_kinds,
    scan_corpora,
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
    subsampling: int = 0  # input frames per output frame: 4 (40 ms) or 2 (20 ms); 0: init_from's, else 4
    dropout: float = 0.15  # recurrent/classifier dropout
    cmn_window: int = -1  # causal mean normalisation window in frames (FeatureConfig; 0: off); -1: init_from's, else off
    cmn_floor_gate: float = -1.0  # its noise-floor gate (FeatureConfig; 0: off); -1: init_from's, else off
    epochs: int = 10  # passes over the (weighted) training data, unless max_steps is set
    max_steps: int = 0  # stop after this many optimizer steps (0: use epochs)
    batch_seconds: float = 240.0  # padded audio seconds per batch (per rank)
    lr: float = 1.5e-3  # peak learning rate
    warmup_steps: int = 300  # linear warm-up
    min_lr_ratio: float = 0.05  # cosine decay floor, as a share of lr
    weight_decay: float = 0.01  # AdamW
    clip_norm: float = 5.0  # gradient norm clip
    seed: int = 0  # data order, augmentation and initialisation
    augment: bool = True  # augment training batches (False: none at all)
    augment_kinds: str = "speed,gain,noise,specaugment"  # which augmentations (AUGMENT_KINDS), comma-separated
    init_from: str = ""  # start from this checkpoint's weights and feature statistics (fine-tuning)
    teacher: str = ""  # distil from this model's CTC posteriors (e.g. the BiGRU into the streaming GRU)
    distill_weight: float = 1.0  # loss = CTC + distill_weight * frame KL(teacher || student)
    distill_delay: int = 0  # output frames the student lags the teacher (a causal model emits later)
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
            weight = float(w)
        except ValueError:
            return arg, 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--train {arg}: the weight (repeats per epoch) must be a number above 0")
        return path, weight
    return arg, 1.0

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: torch.device) -> tuple[Dist, bool]:
    """Join the process group torchrun describes in the environment (nothing for one process).

    Returns the ranks and whether this call created the group (and so must destroy it): a
    caller that already initialised one (to train several times in one job) keeps it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # generous: rank 0 writes checkpoints and plots while the others wait in the next all-reduce
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))), created


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank when `flag` is true on any (a collective: all ranks must call it)."""
    if world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(total: float, count: int, device: torch.device, world_size: int) -> float:
    """sum(total) / sum(count) over all ranks (a collective)."""
    if world_size > 1:
        import torch.distributed as dist

        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def _all_gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# what a step checkpoint holds beyond the model, for --resume (an export holds none of it)
TRAINING_STATE = ("train_config", "run_state", "optimizer")


def load_latest_checkpoint(run_dir: Path, verbose: bool = True) -> tuple[Path, dict] | tuple[None, None]:
    """The newest step checkpoint that reads back completely, and its contents.

    Checkpoints are renamed into place only when complete, so a corrupt one means the disk or a
    copy failed; it is skipped with a warning and the one before it is used.
    """
    for p in sorted((run_dir / CKPT_DIR).glob("step-*.pt"), reverse=True):
        try:
            ckpt = read_checkpoint(p)
        except CheckpointError as e:
            if verbose:
                print(f"warning: skipping unreadable checkpoint {e}", file=sys.stderr)
            continue
        missing = [k for k in TRAINING_STATE if k not in ckpt]
        if not missing:
            return p, ckpt
        if verbose:  # e.g. an inference-only export written over it
            print(f"warning: skipping checkpoint {p}: it holds no training state "
                  f"(no {', '.join(missing)})", file=sys.stderr)
    return None, None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint that reads back completely (corrupt files are skipped)."""
    return load_latest_checkpoint(run_dir)[0]


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on (this rank)
    best_wer: float = float("inf")  # dev WER and CER of best.pt
    best_cer: float = float("inf")
    history: list[dict] = field(default_factory=list)  # dev evaluations


def selection_score(wer: float, cer: float) -> float:
    """Lower is better: dev WER, but while no model has got words right (WER >= 100 %, as early in
    training, when an all-blank output scores exactly 100 % and a babbling one more) the CER decides,
    so best.pt is never a model that outputs nothing."""
    return wer if wer < 1.0 else 1.0 + cer


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a step; the message names the checkpoint written."""


def _ignore_signal(signum, frame) -> None:
    pass


class _StopSignal:
    """Once armed, SIGINT and SIGTERM ask the loop to stop after the current step and write a
    checkpoint; before that (loading data, statistics) they stop at once, as there is nothing to save.

    A second signal within `grace_s` is taken as the same request (torchrun forwards the
    terminal's Ctrl-C to its workers, which have already received it); a later one stops at once.
    """

    def __init__(self, grace_s: float = 3.0):
        self.grace_s = grace_s
        self.armed = False
        self.requested_at: float | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.armed:
            raise KeyboardInterrupt
        if self.requested_at is None:
            self.requested_at = now
            # the same signal may end the DataLoader workers (SIGTERM to every process of a job):
            # torch's SIGCHLD handler would then raise at any line, even while the checkpoint is
            # written. Without it a dead worker shows up at the next batch (_WorkersStopped).
            # A no-op handler, not SIG_DFL: a SIGCHLD already pending when the handler changes
            # would otherwise raise "OSError: Signal 17 ignored due to race condition".
            if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._previous:
                self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore_signal)
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step and saving "
                             f"a checkpoint (again to quit at once)\n")
        elif now - self.requested_at > self.grace_s:
            raise KeyboardInterrupt

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: installed outside Python, nothing to restore
                signal.signal(sig, handler)


def _quiet_worker(_worker_id: int) -> None:
    """DataLoader workers leave the terminal's Ctrl-C (sent to the whole process group) to the main
    process, which stops cleanly after a step. SIGTERM keeps its default: it is how workers are
    ended when the main process exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _WorkersStopped(Exception):
    """The DataLoader workers died from the stop signal that also reached the main process."""


def _batches(loader, stop: _StopSignal):
    """Iterate a DataLoader; a worker failure after a stop request (SIGTERM sent to every process,
    as cluster schedulers do) becomes _WorkersStopped, so the run can still checkpoint and stop."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError:
            if stop.requested:
                raise _WorkersStopped from None
            raise
        yield batch


def _worker_error_message(e: Exception) -> str:
    """An exception re-raised from a DataLoader worker carries the worker's whole traceback in its
    message; keep its last line without the class name."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    name = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(name):] if last.startswith(name) else last


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed run left behind (never complete; the renamed files are)."""
    for folder in (out, out / CKPT_DIR):
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _read_metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line cut short by a crash is ignored."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "event" in row and "step" in row:
            rows.append(row)
    return rows


def _rewind_metrics(out: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they are about to be trained again)."""
    if (out / "metrics.jsonl").exists():
        rows = [r for r in _read_metrics(out) if r["step"] <= step]
        _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _resumed_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """A resumed run keeps its recipe; only where it runs may change, and an explicit max_steps
    re-plans the schedule (to extend or shorten a run)."""
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    base = TrainConfig(**{**saved, "train": tuple(saved["train"]), "dev": tuple(saved["dev"])})
    return replace(base, out=cfg.out, device=cfg.device, num_workers=cfg.num_workers,
                   max_steps=cfg.max_steps or base.max_steps, debug_ranks=cfg.debug_ranks,
                   skip_bad=cfg.skip_bad or base.skip_bad)


def _front_end_mismatches(ckpt: dict, path: str, fcfg: FeatureConfig, vocab: Vocab,
                          any_cmn: bool = False) -> list[str]:
    """What of a checkpoint's features and vocabulary differs from this run's (empty: it fits).
    `any_cmn`: the running-mean setting may differ (fine-tuning onto it, or off it)."""
    wrong = []
    theirs = checkpoint_feature_config(ckpt, path)
    if any_cmn:
        theirs = replace(theirs, cmn_window=fcfg.cmn_window, cmn_prior=fcfg.cmn_prior,
                         cmn_floor_gate=fcfg.cmn_floor_gate, cmn_floor_rise=fcfg.cmn_floor_rise)
    if theirs != fcfg:
        wrong.append("its feature settings")
    if ckpt["vocab"] != vocab.to_dict():
        wrong.append("its vocabulary")
    return wrong


def _init_checkpoint(cfg: TrainConfig, fcfg: FeatureConfig, vocab: Vocab) -> dict:
    """The checkpoint --init-from names, checked to fit the configured model (dropout, subsampling and
    the running mean may differ: the weights have the same shapes either way)."""
    ckpt = read_checkpoint(cfg.init_from)
    want = {"bidirectional": cfg.arch == "bigru", "cell": cfg.cell, "conv_channels": cfg.conv_channels,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers}
    got = ckpt["model_config"]
    wrong = [f"{k} {got.get(k)!r} (not {v!r})" for k, v in want.items() if got.get(k) != v]
    wrong += _front_end_mismatches(ckpt, cfg.init_from, fcfg, vocab, any_cmn=True)
    if wrong:
        raise CheckpointError(f"--init-from {cfg.init_from}: does not fit this model: it has "
                              + ", ".join(wrong) + " (pass the same --arch/--cell/sizes)")
    return ckpt


class Teacher:
    """A frozen model whose CTC posteriors the student learns to match, frame by frame.

    The student's frame t is compared with the teacher's frame t - delay: a causal (streaming)
    student emits each symbol a few frames after a bidirectional teacher that sees the future. The
    teacher gets the student's (augmented, normalised) features, mapped to its own statistics.
    """

    def __init__(self, model: CTCModel, scale: Tensor, shift: Tensor, weight: float, delay: int):
        self.model = model.eval().requires_grad_(False)
        self.scale, self.shift = scale, shift  # student-normalised -> teacher-normalised, per bin
        self.weight = weight
        self.delay = delay

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def loss(self, feats: Tensor, lengths: Tensor, log_probs: Tensor, out_lengths: Tensor) -> Tensor:
        """Sum over utterances and frames of KL(teacher[t - delay] || student[t]), divided by B."""
        with torch.no_grad():
            frame = torch.arange(feats.shape[1], device=feats.device)
            inside = frame[None, :] < lengths.to(feats.device)[:, None]  # zero beyond each length
            teacher_lp, _ = self.model((feats * self.scale + self.shift) * inside[..., None], lengths)
        d = self.delay
        n = log_probs.shape[1] - d
        if n <= 0:
            return log_probs.sum() * 0.0
        t_lp = teacher_lp[:, :n].float()
        s_lp = log_probs[:, d:].float()
        frame = torch.arange(d, d + n, device=log_probs.device)
        valid = frame[None, :] < out_lengths.to(log_probs.device)[:, None]  # (B, n)
        kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # (B, n)
        return (kl * valid).sum() / log_probs.shape[0]


def _checkpoint_subsampling(ckpt: dict) -> int:
    """A checkpoint's output frame rate (ModelConfig's default for files written before the option)."""
    return ckpt["model_config"].get("subsampling", ModelConfig.subsampling)


def run_subsampling(cfg: TrainConfig, source: dict | None) -> int:
    """The output frame rate a run trains at: the configured one, else that of the checkpoint it
    starts from (--resume or --init-from: no silent change of rate), else ModelConfig's default (4,
    40 ms frames)."""
    if cfg.subsampling:
        return cfg.subsampling
    return _checkpoint_subsampling(source) if source is not None else ModelConfig.subsampling


def run_cmn(cfg: TrainConfig, source: dict | None) -> tuple[int, float]:
    """The running-mean window and noise-floor gate a run trains with: each the configured one, else
    that of the checkpoint it starts from (the gate only while there is a running mean), else 0 (off)."""
    theirs = checkpoint_feature_config(source, cfg.init_from or cfg.out) if source is not None else FeatureConfig()
    window = cfg.cmn_window if cfg.cmn_window >= 0 else theirs.cmn_window
    if cfg.cmn_floor_gate >= 0:
        if cfg.cmn_floor_gate and not window:
            raise ValueError("--cmn-floor-gate gates the running mean: it needs --cmn-window too")
        return window, cfg.cmn_floor_gate
    return window, theirs.cmn_floor_gate if window else 0.0


def load_teacher(cfg: TrainConfig, fcfg: FeatureConfig, vocab: Vocab, stats: FeatureStats) -> Teacher:
    """The --teacher checkpoint, checked to share the student's features, vocabulary and
    subsampling (so their output frames line up). `cfg.subsampling` is the student's resolved
    rate (see run_subsampling)."""
    ckpt = read_checkpoint(cfg.teacher)
    if fcfg.cmn_window or checkpoint_feature_config(ckpt, cfg.teacher).cmn_window:
        raise CheckpointError(f"--teacher {cfg.teacher}: distillation maps the student's features onto the "
                              f"teacher's statistics, which a running mean (--cmn-window) does not allow")
    wrong = _front_end_mismatches(ckpt, cfg.teacher, fcfg, vocab)
    teacher_sub = _checkpoint_subsampling(ckpt)
    student_sub = cfg.subsampling
    if teacher_sub != student_sub:
        wrong.append(f"subsampling {teacher_sub} (not {student_sub})")
    if wrong:
        raise CheckpointError(f"--teacher {cfg.teacher}: does not fit this model: it has "
                              + " and ".join(wrong) + " (the student's must be the same)")
    loaded = model_from_checkpoint(ckpt, cfg.teacher)
    t_stats = loaded.stats
    return Teacher(loaded.model, stats.std / t_stats.std, (stats.mean - t_stats.mean) / t_stats.std,
                   cfg.distill_weight, cfg.distill_delay)


def _load_training_data(cfg: TrainConfig, vocab: Vocab):
    """Training utterances with their per-epoch weights, dev utterances, and the problems skipped.

    Problems of all corpora (train and dev) are collected first and reported together."""
    corpora = [parse_corpus_arg(a) for a in cfg.train]
    train_groups, problems = scan_corpora([p for p, _ in corpora], vocab)
    dev_groups, dev_problems = scan_corpora(list(cfg.dev), vocab) if cfg.dev else ([], [])
    problems += dev_problems
    check_problems([p for p, _ in corpora] + list(cfg.dev), problems, cfg.skip_bad)
    train_utts, weights = [], []
    for (_, w), group in zip(corpora, train_groups, strict=True):
        train_utts += group
        weights += [w] * len(group)
    if train_utts and sum(weights) < 1:
        raise ValueError(f"the --train weights give {sum(weights):.2g} utterances per epoch: "
                         f"raise them so that an epoch holds at least one")
    if not train_utts:
        raise CorpusError([CorpusProblem(", ".join(cfg.train), 0, "no usable training utterances")])
    dev_utts = [u for g in dev_groups for u in g]
    if cfg.dev and not dev_utts:
        raise CorpusError([CorpusProblem(", ".join(cfg.dev), 0, "no usable dev utterances")])
    return train_utts, weights, dev_utts, len(problems)


def train(cfg: TrainConfig, resume: bool = False,
          on_step: Callable[[int], None] | None = None) -> Path | None:
    """Train a model; returns the path of the best checkpoint (or the last one without dev).

    Under torchrun every process calls this; rank 0 alone logs, plots and writes files, and only
    it gets a path back (the others get None). `on_step(step)` runs after every optimizer step.
    Raises CorpusError, CheckpointError, AudioError or ValueError for unusable input, OSError when
    a file cannot be written (the last complete checkpoint is kept), and TrainingInterrupted after
    SIGINT/SIGTERM once the checkpoint of the current step is written.
    """
    device = _pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist_info, created_group = _setup_dist(device)
    try:
        with _StopSignal() as stop:
            return _train(cfg, resume, on_step, device, dist_info, stop)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, on_step: Callable[[int], None] | None,
           device: torch.device, dist_info: Dist, stop: _StopSignal) -> Path | None:
    out = Path(cfg.out)
    main, world = dist_info.main, dist_info.world_size
    vocab = Vocab()
    fcfg = FeatureConfig()

    state = RunState()
    resume_ckpt = None
    if resume:
        last, resume_ckpt = load_latest_checkpoint(out, verbose=main)
        if resume_ckpt is None:
            if main:
                print(f"--resume: no complete checkpoint in {out / CKPT_DIR}: starting a new run")
        else:
            new_cfg = _resumed_config(cfg, resume_ckpt["train_config"])
            if main and (new_cfg.train, new_cfg.dev) != (cfg.train, cfg.dev):
                print("note: --resume keeps the run's own corpora and settings (from its checkpoint)")
            cfg = new_cfg
            state = RunState(**resume_ckpt["run_state"])
            if main:
                print(f"resuming from {last} (step {state.step}, epoch {state.epoch})")
    elif (out / CKPT_DIR).exists() and any((out / CKPT_DIR).glob("step-*.pt")):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue it, "
                         f"or choose a new --out folder")

    train_utts, weights, dev_utts, skipped = _load_training_data(cfg, vocab)
    if main and skipped:
        print(f"skipped {skipped} corpus problem(s) (--skip-bad)")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    init = _init_checkpoint(cfg, fcfg, vocab) if resume_ckpt is None and cfg.init_from else None
    window, gate = run_cmn(cfg, resume_ckpt or init)
    cfg = replace(cfg, subsampling=run_subsampling(cfg, resume_ckpt or init), cmn_window=window,
                  cmn_floor_gate=gate)
    fcfg = replace(fcfg, cmn_window=cfg.cmn_window, cmn_floor_gate=cfg.cmn_floor_gate)
    if resume_ckpt is not None:
        stats = FeatureStats.from_dict(resume_ckpt["feature_stats"])
    elif init is not None:
        stats = FeatureStats.from_dict(init["feature_stats"])
    else:
        probe = SpeechDataset(train_utts, vocab, fcfg, None, skip_bad=cfg.skip_bad)
        try:
            stats = feature_stats(probe, cfg.stats_utterances, cfg.seed)
        except AudioError as e:
            raise AudioError(f"{e} (while measuring the feature statistics; --skip-bad skips "
                             f"such files)") from None
    mcfg = ModelConfig(n_mels=fcfg.n_mels, vocab_size=len(vocab), bidirectional=cfg.arch == "bigru",
                       cell=cfg.cell, conv_channels=cfg.conv_channels, hidden_size=cfg.hidden_size,
                       num_layers=cfg.num_layers, dropout=cfg.dropout, subsampling=cfg.subsampling)
    model = CTCModel(mcfg).to(device)
    if world > 1:
        # same initial weights everywhere (DDP also broadcasts rank 0's), own dropout masks per rank
        torch.manual_seed(cfg.seed + 1_000_003 * dist_info.rank)
    if init is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in init["state_dict"].items()})
        if main:
            print(f"initialised from {cfg.init_from} (its step {init['meta'].get('step', '?')})")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        if "scaler" in resume_ckpt and device.type == "cuda":
            scaler.load_state_dict(resume_ckpt["scaler"])
        rng = resume_ckpt["rng"]
        if len(rng.get("ranks") or []) == world:
            rng = rng["ranks"][dist_info.rank]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    teacher = load_teacher(cfg, fcfg, vocab, stats).to(device) if cfg.teacher else None
    if main and teacher is not None:
        print(f"distilling from {cfg.teacher} (weight {cfg.distill_weight}, student delay "
              f"{cfg.distill_delay} frames)")
    aug = augment_config(parse_augment_kinds(cfg.augment_kinds)) if cfg.augment else None
    ds = SpeechDataset(train_utts, vocab, fcfg, stats, aug, skip_bad=cfg.skip_bad)
    sampler = DurationBatchSampler([u.duration for u in train_utts], cfg.batch_seconds, cfg.seed,
                                   weights, dist_info.rank, world, augment=aug is not None)
    steps_per_epoch = len(sampler.rank_batches(0))
    total_steps = cfg.max_steps or sum(len(sampler.rank_batches(e)) for e in range(cfg.epochs))
    train_hours = sum(u.duration for u in train_utts) / 3600
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        if resume_ckpt is not None:
            _rewind_metrics(out, state.step)
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # left by a run killed before its first checkpoint
        print(f"train: {len(train_utts)} utterances, {train_hours:.2f} h; dev: {len(dev_utts)}; "
              f"model {cfg.arch}/{cfg.cell} {count_parameters(model) / 1e6:.2f} M parameters; "
              f"{steps_per_epoch} steps/epoch x {world} rank(s); {total_steps} steps; "
              f"device {device}")
        _atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=1))

    prior_wall = resume_ckpt["meta"].get("wall_seconds", 0.0) if resume_ckpt else 0.0
    t_start = time.time()
    saved_step = state.step if resume_ckpt is not None else -1
    last_plot = 0.0

    def plot(force: bool = False) -> None:
        nonlocal last_plot
        if force or time.time() - last_plot > 60:
            plot_run(out)
            last_plot = time.time()

    def checkpoint(final: bool = False) -> Path:
        """Collective: every rank calls it at the same step; rank 0 writes the file."""
        nonlocal saved_step
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        all_rng = _all_gather(rng, world)
        path = out / CKPT_DIR / f"step-{state.step:08d}.pt"
        saved_step = state.step
        if not main:
            return path
        extra = {"train_config": asdict(cfg), "run_state": asdict(state), "optimizer": opt.state_dict(),
                 "rng": {**rng, "ranks": all_rng if world > 1 else None}}
        if device.type == "cuda":
            extra["scaler"] = scaler.state_dict()
        meta = {"step": state.step, "epoch": state.epoch, "best_dev_wer": state.best_wer,
                "train_corpora": list(cfg.train), "dev_corpora": list(cfg.dev),
                "train_hours": round(train_hours, 3),
                "wall_seconds": round(time.time() - t_start + prior_wall, 1)}
        _save(make_checkpoint(model, fcfg, stats, vocab, meta, **extra), path)
        for old in sorted((out / CKPT_DIR).glob("step-*.pt"))[:-cfg.keep_last]:
            old.unlink(missing_ok=True)
        plot(force=final)
        return path

    dev_warned: set[str] = set()  # dev utterances --skip-bad has already warned about

    def evaluate() -> None:
        """Collective: each rank decodes a shard of the dev set; rank 0 logs and keeps the best."""
        if not dev_utts:
            return
        lm = LoadedModel(model, fcfg, stats, vocab)
        shard = dev_utts[dist_info.rank::world]
        hyps: list[str | None] = [""] * len(dev_utts)
        skipped: list[tuple[str, str]] | None = [] if cfg.skip_bad else None
        mine = decode_utterances(lm, shard, skipped=skipped) if shard else []
        for uid, message in skipped or []:
            if uid not in dev_warned:
                dev_warned.add(uid)
                tqdm.write(f"warning: dev utterance {uid} left out (--skip-bad): {message}", file=sys.stderr)
        for r, part in enumerate(_all_gather(mine, world)):
            hyps[r::world] = part
        scored = [(u.text, h) for u, h in zip(dev_utts, hyps, strict=True) if h is not None]
        if not scored:
            raise AudioError("no dev utterance could be decoded (--skip-bad left them all out)")
        ec = error_counts([ref for ref, _ in scored], [h for _, h in scored])
        row = {"step": state.step, "epoch": state.epoch, "dev_wer": ec.wer, "dev_cer": ec.cer}
        state.history.append(row)
        improved = selection_score(ec.wer, ec.cer) < selection_score(state.best_wer, state.best_cer)
        if improved:
            state.best_wer, state.best_cer = ec.wer, ec.cer
        if not main:
            return
        _log(out, {"event": "dev", **row})
        tqdm.write(f"step {state.step} | dev WER {100 * ec.wer:.2f}% | CER {100 * ec.cer:.2f}%")
        if improved:
            best = make_checkpoint(model, fcfg, stats, vocab,
                                   {"step": state.step, "epoch": state.epoch, "dev_wer": ec.wer,
                                    "dev_cer": ec.cer, "train_corpora": list(cfg.train),
                                    "dev_corpora": list(cfg.dev), "train_config": asdict(cfg)})
            _save(best, out / "best.pt")
        plot(force=True)

    seen: list[tuple[int, str]] = []  # (epoch, utterance id) of every item trained on, for --debug-ranks
    first_step = state.step
    tty = sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=state.step, disable=not (main and tty), dynamic_ncols=True,
               unit="step", smoothing=0.05, file=sys.stderr)
    ddp_model.train()
    window = {"loss": 0.0, "n": 0, "audio_s": 0.0, "t": time.time()}
    speed = {"audio_s": 0.0, "t": time.time()}  # for the bar: audio seconds per wall second, over 2 s
    stop.armed = True
    batches = None
    try:
        while state.step < total_steps:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
                worker_init_fn=_quiet_worker if cfg.num_workers else None,
                generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
            batches = _batches(loader, stop)
            whole_epoch, any_batch, stepped = state.batch_in_epoch == 0, False, False
            for batch in batches:
                any_batch = True
                for uid, message in batch["skipped"]:  # --skip-bad: damage the scan could not see
                    tqdm.write(f"warning: left {uid} out of a batch (--skip-bad): {message}", file=sys.stderr)
                if batch["feats"] is None:  # every utterance of the batch failed to decode
                    if world > 1:  # the other ranks are stepping: stop as without --skip-bad
                        raise AudioError(batch["skipped"][0][1])
                    state.batch_in_epoch += 1
                    continue
                lr = get_lr(state.step, total_steps, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_value, grad_norm = train_step(ddp_model, opt, scaler, batch, device, cfg.clip_norm,
                                                  teacher)
                stepped = True
                state.step += 1
                state.batch_in_epoch += 1
                if cfg.debug_ranks:
                    seen.extend((state.epoch, uid) for uid in batch["ids"])
                audio_s = float(batch["lengths"].sum()) / 100.0 * world  # all ranks' audio
                window["loss"] += loss_value
                window["n"] += 1
                window["audio_s"] += audio_s
                if main:
                    speed["audio_s"] += audio_s
                    bar.update(1)
                    if time.time() - speed["t"] >= 2.0 or "rate" not in speed:
                        speed["rate"] = speed["audio_s"] / max(time.time() - speed["t"], 1e-9)
                        speed.update(audio_s=0.0, t=time.time())
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}",
                                    audio=f"{speed['rate']:.0f}s/s", epoch=state.epoch, refresh=False)
                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    mean_loss = _mean_over_ranks(window["loss"], window["n"], device, world)
                if main and (state.step % cfg.log_every == 0 or state.step == total_steps):
                    dt = time.time() - window["t"]
                    elapsed = time.time() - t_start
                    row = {"event": "train", "step": state.step, "epoch": state.epoch,
                           "loss": mean_loss, "lr": lr,
                           "grad_norm": float(grad_norm),
                           "audio_s_per_s": window["audio_s"] / max(dt, 1e-9),
                           "elapsed_s": round(elapsed + prior_wall, 1)}
                    _log(out, row)
                    if not tty:  # a log file gets one line per interval instead of the bar
                        done = state.step - first_step
                        eta = elapsed / max(done, 1) * (total_steps - state.step)
                        print(f"step {state.step}/{total_steps} | epoch {state.epoch} | loss "
                              f"{row['loss']:.3f} | lr {lr:.1e} | {row['audio_s_per_s']:.0f} audio s/s"
                              f" | {1000 * dt / window['n']:.0f} ms/step | ETA {_hms(eta)}", flush=True)
                if state.step % cfg.log_every == 0:
                    window = {"loss": 0.0, "n": 0, "audio_s": 0.0, "t": time.time()}
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    evaluate()
                    ddp_model.train()
                if state.step % cfg.save_every == 0:
                    checkpoint()
                if on_step is not None:
                    on_step(state.step)
                if state.step < total_steps and _any_rank(stop.requested, device, world):
                    path = checkpoint(final=True) if saved_step != state.step else \
                        out / CKPT_DIR / f"step-{state.step:08d}.pt"
                    if world > 1:
                        import torch.distributed as dist

                        dist.barrier()  # nobody exits (and gets the others killed) before the file is written
                    raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint {path}")
                if state.step >= total_steps:
                    break
            else:
                if whole_epoch and any_batch and not stepped:  # --skip-bad left every batch out: it never would step
                    raise AudioError(f"no batch of epoch {state.epoch} could be decoded (--skip-bad "
                                     f"left every utterance out)")
                # the epoch ran out: evaluate, checkpoint, move on
                state.epoch += 1
                state.batch_in_epoch = 0
                if not state.history or state.history[-1]["step"] != state.step:
                    evaluate()
                    ddp_model.train()
                checkpoint()
                continue
            break
    except _WorkersStopped:
        if world > 1:  # the ranks cannot agree on a checkpoint any more: the last one stays
            raise TrainingInterrupted(f"stopped at step {state.step} (data workers ended before "
                                      f"a checkpoint could be written)") from None
        path = checkpoint(final=True) if saved_step != state.step else \
            out / CKPT_DIR / f"step-{state.step:08d}.pt"
        raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint {path}") from None
    except AudioError as e:
        message = _worker_error_message(e)
        if world == 1 and saved_step != state.step:
            checkpoint()  # keep the steps done so far (a collective would hang with one rank failing)
        hint = "" if cfg.skip_bad else " (or add --skip-bad)"
        raise AudioError(f"training stopped: {message}; fix or remove the file{hint}, then continue "
                         f"with --resume") from None
    finally:
        bar.close()
        if batches is not None:
            batches.close()  # shuts the DataLoader workers down now, not when the traceback goes
    if not state.history or state.history[-1]["step"] != state.step:
        evaluate()
    last = checkpoint(final=True) if saved_step != state.step else \
        out / CKPT_DIR / f"step-{state.step:08d}.pt"
    if main and saved_step == state.step:
        plot(force=True)
    if cfg.debug_ranks:
        (out / "ranks").mkdir(parents=True, exist_ok=True)
        (out / "ranks" / f"rank{dist_info.rank}.json").write_text(json.dumps(
            {"rank": dist_info.rank, "world_size": world, "step": state.step, "seen": seen,
             "params": {k: v.detach().cpu().flatten().tolist() for k, v in model.state_dict().items()}}))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the others wait until rank 0 has written the last checkpoint
    if not main:
        return None
    return out / "best.pt" if (out / "best.pt").exists() else last


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batch: dict, device: torch.device, clip_norm: float,
               teacher: Teacher | None = None) -> tuple[float, float]:
    """One optimizer step on a collated batch: CTC loss per utterance (plus the teacher's weighted
    distillation loss), float16 autocast on CUDA, gradient clipping. `model` may be DDP-wrapped.
    Returns (loss, gradient norm before clipping)."""
    feats = batch["feats"].to(device, non_blocking=True)  # (B, T, F)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        log_probs, out_lengths = model(feats, batch["lengths"])  # (B, T', V), (B,)
        distill = teacher.loss(feats, batch["lengths"], log_probs, out_lengths) if teacher else None
    loss = F.ctc_loss(log_probs.transpose(0, 1).float(), batch["targets"].to(device),
                      out_lengths, batch["target_lengths"].to(device), blank=0,
                      reduction="sum", zero_infinity=True) / feats.shape[0]
    if distill is not None:
        loss = loss + teacher.weight * distill
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(opt)
    scaler.update()
    return loss.item(), float(grad_norm)


def _save(ckpt: dict, path: Path) -> None:
    """atomic_save, with the file named in the error (torch.save only sees an open file)."""
    try:
        atomic_save(ckpt, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _log(out: Path, row: dict) -> None:
    """Append one JSON line to out/metrics.jsonl (a line cut short by a crash is skipped on reading)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_run(out: Path) -> None:
    """training loss and dev WER/CER against steps -> out/plot.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(out)
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
    tmp = out / f".plot.png.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, out / "plot.png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def export_model(src: str | os.PathLike | list, dst: str | os.PathLike, half: bool = True) -> dict:
    """Inference-only copy of a checkpoint (no optimizer), optionally in float16.

    Several sources (checkpoints of one run, e.g. its last few steps) are averaged weight by
    weight; for the shipped runs this gained nothing over the last step (models/README.md)."""
    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if os.path.realpath(dst) in {os.path.realpath(s) for s in srcs}:
        raise CheckpointError(f"{dst}: the output would overwrite one of the checkpoints it is made from")
    if os.path.isfile(dst):
        try:
            held = read_checkpoint(dst)
        except CheckpointError:
            held = {}  # not a readable checkpoint: nothing a run needs
        if any(k in held for k in TRAINING_STATE):
            raise CheckpointError(f"{dst}: a training checkpoint (with its optimizer state) is "
                                  f"there; export to another file")
    cks = [read_checkpoint(s) for s in srcs]
    models = [model_from_checkpoint(ck, str(s)) for ck, s in zip(cks, srcs, strict=True)]
    lm = models[-1]
    meta = dict(cks[-1].get("meta", {}))
    if len(models) > 1:
        for m, s in zip(models[:-1], srcs[:-1], strict=True):
            for what, a, b in (("model", m.model.cfg, lm.model.cfg),
                               ("feature configuration", m.feature_config, lm.feature_config),
                               ("vocabulary", m.vocab.tokens, lm.vocab.tokens)):
                if a != b:
                    raise CheckpointError(f"{s}: cannot average: its {what} differs from that of {srcs[-1]}")
            if not (torch.equal(m.stats.mean, lm.stats.mean) and torch.equal(m.stats.std, lm.stats.std)):
                raise CheckpointError(f"{s}: cannot average: its feature statistics differ from those "
                                      f"of {srcs[-1]} (another run?)")
        lm.model.load_state_dict(average_state_dicts([m.model.state_dict() for m in models]))
        meta["averaged_steps"] = [ck.get("meta", {}).get("step") for ck in cks]
    out = make_checkpoint(lm.model, lm.feature_config, lm.stats, lm.vocab, meta, half=half)
    atomic_save(out, dst)
    return meta


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of the floating-point tensors of several state dicts of one model
    (integer buffers are taken from the last)."""
    out = {}
    for k, v in states[-1].items():
        out[k] = (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                  if v.is_floating_point() else v)
    return out
