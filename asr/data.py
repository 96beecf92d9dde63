"""LibriSpeech-layout corpora: scanning into manifests, augmentation, duration-bucketed batches.

A corpus is any folder holding, at any depth, `SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.<audio>` files and
one `SPEAKER-CHAPTER.trans.txt` per chapter with lines `SPEAKER-CHAPTER-UTT TRANSCRIPT`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .audio import (
    AUDIO_EXTENSIONS,
    MIN_DURATION_S,
    SAMPLE_RATE,
    AudioError,
    audio_duration,
    load_audio,
    resample,
)
from .features import FeatureConfig, FeatureStats, StatsAccumulator, log_mel, normalize_features
from .text import Vocab, normalize_text

_ID = re.compile(r"^[A-Za-z0-9]+-[A-Za-z0-9]+-[A-Za-z0-9]+$")
MANIFEST_VERSION = 3  # bump when scanning rules change: cached manifests are then rebuilt


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str  # absolute audio path
    duration: float  # seconds
    text: str  # normalised transcript
    trans: str = ""  # transcript file the line came from
    line: int = 0  # 1-based line number in `trans`


@dataclass(frozen=True)
class CorpusProblem:
    file: str
    line: int  # 1-based line in `file`; 0 when the problem is the file itself
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class CorpusError(ValueError):
    """A corpus that cannot be used as it is; the message lists the problems with file and line."""

    def __init__(self, problems: Sequence[CorpusProblem], root: str = ""):
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        where = f" in {root}" if root else ""
        super().__init__(f"{len(self.problems)} corpus problem(s){where} (use --skip-bad to skip them):"
                         f"\n  {shown}{more}")


def _cache_dir() -> Path:
    base = os.environ.get("ASR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "asr-gru")
    return Path(base) / "manifests"


def _fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha1(f"v{MANIFEST_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(os.fsencode(f.relative_to(root)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scan_corpus(root: str | os.PathLike, vocab: Vocab | None = None,
                use_cache: bool = True) -> tuple[list[Utterance], list[CorpusProblem]]:
    """All utterances under `root` and every problem found, each with file and line.

    The manifest (id, path, duration, text) is cached per corpus and rebuilt whenever a transcript or
    audio file is added, removed or changed. Problems: a transcript line without audio, audio without a
    line, a malformed line, characters outside `vocab`, duplicate ids, unreadable audio.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise CorpusError([CorpusProblem(str(root), 0, "corpus folder does not exist")])
    trans_files, audio_files = [], []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            if n.endswith(".trans.txt"):
                trans_files.append(Path(dirpath) / n)
            elif n.lower().endswith(AUDIO_EXTENSIONS):
                audio_files.append(Path(dirpath) / n)
    trans_files.sort()
    audio_files.sort()
    if not trans_files:
        raise CorpusError([CorpusProblem(str(root), 0, "no *.trans.txt transcripts found")])
    key = _fingerprint(root, trans_files + audio_files)
    cache = _cache_dir() / (hashlib.sha1(os.fsencode(root)).hexdigest()[:16] + ".json")
    entries = None
    if use_cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                entries = data["entries"]
        except (OSError, ValueError, KeyError):
            entries = None
    if entries is None:
        entries = _build_entries(trans_files, audio_files)
        if use_cache:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "root": str(root), "entries": entries}))
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only cache only costs a rescan
    utts, problems = [], [CorpusProblem(**p) for p in entries["problems"]]
    for u in entries["utterances"]:
        text = u["text"]
        if vocab is not None and vocab.unknown_chars(text):
            bad = ", ".join(repr(c) for c in sorted(vocab.unknown_chars(text)))
            problems.append(CorpusProblem(u["trans"], u["line"], f"{u['id']}: characters not in the vocabulary: {bad}"))
            continue
        utts.append(Utterance(u["id"], u["path"], u["duration"], text, u["trans"], u["line"]))
    return utts, problems


def _build_entries(trans_files: list[Path], audio_files: list[Path]) -> dict:
    by_stem: dict[str, list[Path]] = {}
    for a in audio_files:
        by_stem.setdefault(str(a.parent / a.name.rsplit(".", 1)[0]), []).append(a)
    used: set[Path] = set()
    seen: dict[str, str] = {}
    utterances, problems = [], []

    def problem(f, line, msg):
        problems.append(asdict(CorpusProblem(str(f), line, msg)))

    for tf in trans_files:
        try:
            lines = tf.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            problem(tf, 0, f"cannot read transcript ({e})")
            continue
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            parts = raw.strip().split(maxsplit=1)
            if len(parts) != 2 or not _ID.match(parts[0]):
                problem(tf, lineno, f"malformed line (expected 'SPEAKER-CHAPTER-UTT TEXT'): {raw[:60]!r}")
                continue
            uid, text = parts
            if uid in seen:
                problem(tf, lineno, f"duplicate utterance id {uid} (first in {seen[uid]})")
                continue
            seen[uid] = f"{tf}:{lineno}"
            candidates = by_stem.get(str(tf.parent / uid), [])
            if not candidates:
                problem(tf, lineno, f"{uid}: no audio file next to the transcript")
                continue
            used.update(candidates)
            if len(candidates) > 1:
                names = ", ".join(sorted(c.name for c in candidates))
                problem(tf, lineno, f"{uid}: several audio files ({names}); keep only one")
                continue
            audio = candidates[0]
            try:
                duration = audio_duration(audio)
            except AudioError as e:
                problem(tf, lineno, str(e))
                continue
            if duration < MIN_DURATION_S:  # what decoding would refuse, seen from the header
                problem(tf, lineno, f"{audio}: too short ({1000 * duration:.0f} ms; need at least "
                                    f"{1000 * MIN_DURATION_S:.0f} ms)")
                continue
            norm = normalize_text(text)
            if not norm:
                problem(tf, lineno, f"{uid}: empty transcript")
                continue
            utterances.append({"id": uid, "path": str(audio), "duration": round(duration, 4),
                               "text": norm, "trans": str(tf), "line": lineno})
    for a in audio_files:
        if a not in used:
            problem(a, 0, "audio file has no transcript line")
    return {"utterances": utterances, "problems": problems}


def scan_corpora(paths: Sequence[str], vocab: Vocab | None = None
                 ) -> tuple[list[list[Utterance]], list[CorpusProblem]]:
    """Scan several corpora that are used together: one utterance list per path, and all problems.

    Besides each corpus's own problems, an id already used by an earlier corpus of the set is a
    duplicate: it is reported (with both transcript lines) and left out of the later corpus.
    """
    groups: list[list[Utterance]] = []
    problems: list[CorpusProblem] = []
    first: dict[str, Utterance] = {}
    for p in paths:
        try:
            utts, found = scan_corpus(p, vocab)
        except CorpusError as e:  # missing folder, no transcripts: report it with the others
            groups.append([])
            problems += e.problems
            continue
        problems += found
        kept = []
        for u in utts:
            if u.id in first:
                f = first[u.id]
                problems.append(CorpusProblem(u.trans, u.line, f"duplicate utterance id {u.id} "
                                                               f"(first in {f.trans}:{f.line})"))
                continue
            first[u.id] = u
            kept.append(u)
        groups.append(kept)
    return groups, problems


def load_corpora(paths: Sequence[str], vocab: Vocab, skip_bad: bool) -> tuple[list[Utterance], int]:
    """Scan several corpora; raise CorpusError listing every problem unless `skip_bad` (then count them)."""
    groups, problems = scan_corpora(paths, vocab)
    check_problems(paths, problems, skip_bad)
    utts = [u for g in groups for u in g]
    if not utts:
        raise CorpusError([CorpusProblem(", ".join(paths), 0, "no usable utterances")])
    return utts, len(problems)


def sample_utterances(utts: Sequence[Utterance], n: int, seed: int = 0) -> list[Utterance]:
    """`n` utterances drawn at random (the same ones for the same corpora and seed), in id order;
    all of them, as they are, when there are no more than `n`."""
    if n >= len(utts):
        return list(utts)
    ordered = sorted(utts, key=lambda u: u.id)
    return sorted(random.Random(seed).sample(ordered, n), key=lambda u: u.id)


def check_problems(paths: Sequence[str], problems: Sequence[CorpusProblem], skip_bad: bool) -> None:
    """Raise CorpusError (one line per problem) unless there are none or `skip_bad` is set."""
    if problems and not skip_bad:
        raise CorpusError(problems, ", ".join(str(p) for p in paths))


# ----------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)  # speed perturbation factors, chosen uniformly
    gain_db: float = 6.0  # random gain in [-gain_db, +gain_db]
    noise_prob: float = 0.5  # chance of additive noise
    snr_db: tuple[float, float] = (10.0, 40.0)  # noise SNR range
    freq_masks: int = 2  # SpecAugment frequency masks
    freq_mask_bins: int = 15  # max width of each
    time_masks: int = 2  # SpecAugment time masks (per 10 s, at least one)
    time_mask_frames: int = 40  # max width of each
    max_time_mask_ratio: float = 0.2  # time masks never cover more than this share of the input
    vtlp: float = 0.1  # vocal tract length perturbation: warp factor uniform in 1 +- this (0: off)

    @property
    def masks(self) -> bool:
        return bool(self.freq_masks or self.time_masks)


AUGMENT_KINDS = ("speed", "gain", "noise", "specaugment", "freqmask", "vtlp")


def parse_augment_kinds(text: str) -> tuple[str, ...]:
    """"speed,noise" -> ("speed", "noise"); "" or "none" -> (); ValueError names an unknown kind."""
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    if kinds == ("none",):
        return ()
    unknown = [k for k in kinds if k not in AUGMENT_KINDS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENT_KINDS)}, "
                         f"or none)")
    return kinds


def augment_config(kinds: Sequence[str]) -> AugmentConfig | None:
    """The default AugmentConfig with only `kinds` switched on; None when there are none."""
    if not kinds:
        return None
    off: dict = {}
    if "speed" not in kinds:
        off["speeds"] = (1.0,)
    if "gain" not in kinds:
        off["gain_db"] = 0.0
    if "noise" not in kinds:
        off["noise_prob"] = 0.0
    if "specaugment" not in kinds:
        off["time_masks"] = 0
        if "freqmask" not in kinds:  # freqmask: SpecAugment's frequency masks alone
            off["freq_masks"] = 0
    if "vtlp" not in kinds:
        off["vtlp"] = 0.0
    return replace(AugmentConfig(), **off)


def perturb_wave(wave: np.ndarray, aug: AugmentConfig, g: torch.Generator) -> np.ndarray:
    """Speed perturbation (resampling: tempo and pitch), gain and noise on the waveform."""
    speed = aug.speeds[int(torch.randint(len(aug.speeds), (1,), generator=g))]
    if speed != 1.0:
        # playing `speed` times faster = reading the samples as if recorded at speed * rate
        wave = resample(wave, int(round(SAMPLE_RATE * speed)), SAMPLE_RATE)
    gain = 10 ** ((torch.rand(1, generator=g).item() * 2 - 1) * aug.gain_db / 20)
    wave = wave * gain
    if torch.rand(1, generator=g).item() < aug.noise_prob:
        snr = aug.snr_db[0] + torch.rand(1, generator=g).item() * (aug.snr_db[1] - aug.snr_db[0])
        power = float(np.mean(wave * wave)) + 1e-10
        noise = torch.randn(len(wave), generator=g).numpy()
        if torch.rand(1, generator=g).item() < 0.5:  # brown-ish noise half the time
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(401) / 401, mode="same")
        noise *= math.sqrt(power / (float(np.mean(noise * noise)) + 1e-10) / 10 ** (snr / 10))
        wave = wave + noise.astype(np.float32)
    return wave.astype(np.float32)


def spec_augment(feats: Tensor, aug: AugmentConfig, g: torch.Generator) -> Tensor:
    """Frequency and time masks on normalised features (T, F); masked values are 0 (the mean)."""
    t, f = feats.shape
    feats = feats.clone()
    for _ in range(aug.freq_masks):
        w = int(torch.randint(aug.freq_mask_bins + 1, (1,), generator=g))
        s = int(torch.randint(max(1, f - w), (1,), generator=g))
        feats[:, s:s + w] = 0
    n_time = max(1, round(aug.time_masks * t / 1000)) if aug.time_masks else 0
    max_w = min(aug.time_mask_frames, int(aug.max_time_mask_ratio * t / max(1, n_time)))
    for _ in range(n_time):
        if max_w < 1:
            break
        w = int(torch.randint(max_w + 1, (1,), generator=g))
        s = int(torch.randint(max(1, t - w), (1,), generator=g))
        feats[s:s + w] = 0
    return feats


# ----------------------------------------------------------------------------- dataset and batches


class SpeechDataset(torch.utils.data.Dataset):
    """Items are (index, augmentation seed) pairs from DurationBatchSampler -> (feats, targets, id)."""

    def __init__(self, utts: Sequence[Utterance], vocab: Vocab, feature_config: FeatureConfig,
                 stats: FeatureStats | None, augment: AugmentConfig | None = None,
                 skip_bad: bool = False):
        self.utts = list(utts)
        self.vocab = vocab
        self.fcfg = feature_config
        self.stats = stats
        self.augment = augment
        # True: audio that fails to decode (damage the header scan cannot see) becomes a
        # (None, message, id) item that `collate` leaves out, instead of raising AudioError
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.utts)

    def features(self, idx: int, seed: int | None = None) -> Tensor:
        """(T, F) features of utterance idx, augmented when the dataset augments and a seed is given."""
        u = self.utts[idx]
        wave = load_audio(u.path, self.fcfg.sample_rate)
        g = None
        if self.augment is not None and seed is not None:
            g = torch.Generator().manual_seed(seed)
            wave = perturb_wave(wave, self.augment, g)
        warp = 1.0
        if g is not None and self.augment.vtlp:  # drawn after perturb_wave's draws: they stay as they were
            warp = 1.0 + (torch.rand(1, generator=g).item() * 2 - 1) * self.augment.vtlp
        feats = normalize_features(log_mel(wave, self.fcfg, vtlp=warp), self.fcfg, self.stats)
        if g is not None and self.augment.masks:
            feats = spec_augment(feats, self.augment, g)
        return feats

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[Tensor | None, Tensor | str, str]:
        idx, seed = item
        try:
            feats = self.features(idx, seed)
        except AudioError as e:
            if not self.skip_bad:
                raise
            return None, str(e), self.utts[idx].id
        targets = torch.tensor(self.vocab.encode(self.utts[idx].text), dtype=torch.long)
        return feats, targets, self.utts[idx].id


def collate(batch: list[tuple[Tensor | None, Tensor | str, str]]) -> dict:
    """Pad to (B, T, F) with zeros; integer lengths, concatenated targets for CTC. Items a
    skipping dataset could not decode are left out and listed as (id, message) in "skipped"; a
    batch of nothing else has "feats" None."""
    skipped = [(b[2], b[1]) for b in batch if b[0] is None]
    batch = [b for b in batch if b[0] is not None]
    if not batch:
        return {"feats": None, "ids": [], "skipped": skipped}
    feats = [b[0] for b in batch]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    targets = [b[1] for b in batch]
    return {"feats": padded, "lengths": lengths, "targets": torch.cat(targets),
            "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
            "ids": [b[2] for b in batch], "skipped": skipped}


class DurationBatchSampler:
    """Batches of similar-length utterances filled up to `batch_seconds` of padded audio.

    Every epoch's order is a pure function of (seed, epoch): utterances are sorted by jittered
    duration, packed into batches, and the batches shuffled; with `weights` an utterance appears
    floor(w) times plus once more with probability frac(w). With `world_size` > 1 the largest
    batches are halved until the count is a multiple of world_size, and rank r takes batches
    r, r + world_size, ...: equal step counts, every utterance once per epoch across the ranks.
    """

    def __init__(self, durations: Sequence[float], batch_seconds: float, seed: int = 0,
                 weights: Sequence[float] | None = None, rank: int = 0, world_size: int = 1,
                 augment: bool = True):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_seconds = batch_seconds
        self.seed = seed
        self.weights = np.ones(len(durations)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.rank, self.world_size = rank, world_size
        self.augment = augment
        self.epoch = 0
        self.skip = 0  # batches of this epoch already consumed (resume)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All ranks' batches of an epoch, as (utterance index, augmentation seed) pairs."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        idx = []
        for i, w in enumerate(self.weights):
            reps = int(math.floor(w)) + int(torch.rand(1, generator=g).item() < w - math.floor(w))
            idx.extend([i] * reps)
        idx = np.array(idx, dtype=np.int64)
        perm = torch.randperm(len(idx), generator=g).numpy()
        idx = idx[perm]
        # similar lengths together, but with +-10 % jitter so batches differ between epochs
        jitter = 1 + 0.2 * (torch.rand(len(idx), generator=g).numpy() - 0.5)
        order = idx[np.argsort(self.durations[idx] * jitter, kind="stable")]
        batches, cur, longest = [], [], 0.0
        for i in order.tolist():
            d = self.durations[i]
            if cur and max(longest, d) * (len(cur) + 1) > self.batch_seconds:
                batches.append(cur)
                cur, longest = [], 0.0
            cur.append(i)
            longest = max(longest, d)
        if cur:
            batches.append(cur)
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[j] for j in order]
        out = []
        for b in batches:
            seeds = torch.randint(2**31 - 1, (len(b),), generator=g).tolist()
            out.append([(i, s if self.augment else None) for i, s in zip(b, seeds, strict=True)])
        if self.world_size > 1:
            out = _split_to_multiple(out, self.world_size)
        return out

    def rank_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        return self.epoch_batches(epoch)[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(0, len(self.rank_batches(self.epoch)) - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.rank_batches(self.epoch)[self.skip:]


def _split_to_multiple(batches: list[list], n: int) -> list[list]:
    """Make the batch count a multiple of n by halving the largest batches, so every rank gets the
    same number of steps and each utterance is still used exactly once. Only a corpus with fewer
    utterances than ranks cannot be split so far: then the last batches are dropped."""
    batches = list(batches)
    while len(batches) % n:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        b = batches[i]
        if len(b) < 2:
            return batches[:len(batches) - len(batches) % n]
        batches[i:i + 1] = [b[:len(b) // 2], b[len(b) // 2:]]
    return batches


def feature_stats(dataset: SpeechDataset, max_utts: int = 1000, seed: int = 0) -> FeatureStats:
    """Global mean/std of un-normalised log-mel over (a seeded sample of) the training data; a
    skipping dataset (skip_bad) passes over audio that fails to decode, as its batches do."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[:max_utts].tolist()
    acc = StatsAccumulator(dataset.fcfg.n_mels)
    for i in chosen:
        try:
            wave = load_audio(dataset.utts[i].path, dataset.fcfg.sample_rate)
        except AudioError:
            if not dataset.skip_bad:
                raise
            continue
        acc.add(log_mel(wave, dataset.fcfg))
    if acc.n == 0:
        raise AudioError(f"none of the {len(chosen)} utterances sampled for the feature statistics "
                         f"could be decoded")
    return acc.stats()

