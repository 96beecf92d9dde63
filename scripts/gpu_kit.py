"""Carry training data to a borrowed GPU machine that has none of ../shared/data, and plan the run.

The GPU machine (the `device` tool) takes at most 64 MiB per call, the repository (~21 MB)
included, and keeps ignored folders between calls made while it is still warm. So `pack` splits the
training corpora into parts of a set size, whole chapters in the order given (most important
first), to carry one part per call; `wheels` adds what that machine's Python lacks to every part.
Audio is copied as it is (`--kbps 0`, the default) or re-encoded as Ogg Opus at a lower rate, which
is slow here (~17x real time per core) and not free: the shipped BiGRU tested on librispeech-dev
re-encoded at 16 / 12 / 10 kbit/s lost 1.7 / 1.9 / 2.9 WER points (67.5 % on the FLAC originals).
That is a test-time mismatch; what training on such audio costs was not measured, and the training
corpora here are Opus already (19-28 kbit/s), so `--kbps` encodes them a second time.
There, `unpack` decodes every part that arrived into FLAC (Opus decodes at ~300x real time per core,
FLAC at ~1600x, so training then reads FLAC), and `plan` turns a probe run's speed into the number
of steps that fits the time left.

    # here: the real speech first, parts of <= 38 MB, then the wheels into every part
    python scripts/gpu_kit.py pack --out .gpukit --part-mb 38 ../shared/data/librispeech-train \
        ../shared/data/ljspeech/LibriSpeech/train ../shared/data/fsdd \
        ../shared/data/synth/LibriSpeech/train@2
    python scripts/gpu_kit.py wheels --out .gpukit
    # there (scripts/gpu_run.sh does this): decode what arrived; plan from a probe's metrics
    python3 scripts/gpu_kit.py unpack .gpukit /tmp/data
    python3 scripts/gpu_kit.py plan /tmp/probe/metrics.jsonl --seconds 420

`CORPUS@HOURS` takes the first HOURS of CORPUS (files in sorted order; each chapter's transcript
keeps only their lines). A corpus is named by its folder (`synth/LibriSpeech/train` ->
`synth-train`); parts merge by name when unpacked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf

AUDIO = (".flac", ".opus", ".ogg", ".wav")
WHEELS = ("soundfile==0.13.1", "cffi==2.0.0", "pycparser==2.23", "jiwer==4.0.0", "rapidfuzz==3.14.1")


def corpus_name(path: Path) -> str:
    """../shared/data/librispeech-train -> librispeech-train; synth/LibriSpeech/train -> synth-train."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "LibriSpeech":
        return f"{parts[-3]}-{parts[-1]}"
    return parts[-1]


def chapters(root: Path) -> list[Path]:
    """Folders holding a *.trans.txt, in sorted order (LibriSpeech layout: one per chapter)."""
    return sorted({t.parent for t in root.rglob("*.trans.txt")})


def opus_level(kbps: float) -> float:
    """libsndfile's Opus compression level for about `kbps` (measured on speech: 0.961 -> 16.1,
    0.977 -> 12.3, 0.984 -> 10.7 kbit/s; `pack` prints the rate it reached)."""
    return min(1.0, max(0.0, 1.0 - (kbps - 6.6) / 250.0))


def _encode(job: tuple[str, str, float]) -> None:
    src, dst, level = job
    wave, sr = sf.read(src, dtype="float32")
    sf.write(dst, wave, sr, format="OGG", subtype="OPUS", compression_level=level)


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=16))


def _decode(job: tuple[str, str]) -> float:
    src, dst = job
    wave, sr = sf.read(src, dtype="int16")
    sf.write(dst, wave, sr, format="FLAC", subtype="PCM_16")
    return len(wave) / sr


def pack(specs: list[str], out: Path, kbps: float, part_mb: float, workers: int) -> None:
    staging = out / "staging"
    jobs, chapter_dirs = [], []  # (name, chapter folder relative to the corpus)
    for spec in specs:
        path, _, hours = spec.partition("@")
        root = Path(path)
        if not root.is_dir():
            raise SystemExit(f"error: {root}: no such folder")
        name, budget, taken = corpus_name(root), float(hours) * 3600 if hours else float("inf"), 0.0
        for ch in chapters(root):
            if taken >= budget:
                break
            rel = ch.relative_to(root)
            dst = staging / name / rel
            dst.mkdir(parents=True, exist_ok=True)
            kept = set()
            for f in sorted(f for f in ch.iterdir() if f.suffix in AUDIO):
                if taken >= budget:
                    break
                taken += sf.info(f).duration
                kept.add(f.stem)
                if kbps > 0:
                    jobs.append((str(f), str(dst / (f.stem + ".opus")), opus_level(kbps)))
                else:
                    shutil.copy(f, dst / f.name)
            for t in ch.glob("*.trans.txt"):  # only the lines of the files taken
                lines = [x for x in t.read_text(encoding="utf-8").splitlines() if x.split(" ", 1)[0] in kept]
                (dst / t.name).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
            chapter_dirs.append((name, rel))
        print(f"{root}: {taken / 3600:.2f} h as {name}")
    _map(_encode, jobs, workers)
    part, used, limit = 1, 0, part_mb * 1e6
    for name, rel in chapter_dirs:  # whole chapters, in order, into parts of at most part_mb
        size = sum(f.stat().st_size for f in (staging / name / rel).iterdir())
        if used and used + size > limit:
            part, used = part + 1, 0
        used += size
        dst = out / f"part-{part}" / name / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / name / rel), dst)
    shutil.rmtree(staging)
    for p in sorted(out.glob("part-*")):  # every part knows how many make the whole kit
        (p / "kit.json").write_text(json.dumps({"parts": part}) + "\n")
    for p in sorted(out.glob("part-*")):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        hours = sum(sf.info(f).duration for f in p.rglob("*") if f.suffix in AUDIO) / 3600
        print(f"{p}: {size / 1e6:.1f} MB ({8 * size / hours / 3.6e6:.1f} kbit/s), {hours:.2f} h, "
              f"{', '.join(sorted(d.name for d in p.iterdir() if d.is_dir()))}")
        if size > limit:
            print(f"warning: {p} is over --part-mb: one chapter is larger than that")


def wheels(out: Path) -> None:
    """Wheels for the GPU machine's Python 3.12 (it has torch, torchaudio, numpy, click, tqdm)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
           "--platform", "any", "-d", str(out / "wheels"), *WHEELS]
    subprocess.run(cmd, check=True)
    for p in sorted(out.glob("part-*")):
        shutil.copytree(out / "wheels", p / "wheels", dirs_exist_ok=True)
    print("\n".join(f"{w.name} {w.stat().st_size / 1e6:.1f} MB" for w in sorted((out / "wheels").iterdir())))


def unpack(kit: Path, dest: Path, workers: int) -> None:
    """Every part-*/CORPUS/... under `kit` -> dest/CORPUS/... as FLAC (parts merge by corpus)."""
    jobs = []
    for part in sorted(kit.glob("part-*")):
        for corpus in sorted(d for d in part.iterdir() if d.is_dir() and d.name != "wheels"):
            for f in corpus.rglob("*"):
                if not f.is_file():
                    continue
                target = dest / corpus.name / f.relative_to(corpus)
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.suffix in AUDIO:
                    jobs.append((str(f), str(target.with_suffix(".flac"))))
                else:
                    shutil.copy(f, target)
    if not jobs:
        raise SystemExit(f"error: {kit}: no part-*/CORPUS audio to unpack")
    seconds = sum(_map(_decode, jobs, workers))
    print(f"unpacked {len(jobs)} files, {seconds / 3600:.2f} h: "
          f"{', '.join(sorted(d.name for d in dest.iterdir()))}")


def plan(metrics: Path, seconds: float, skip: int) -> int:
    """Steps that fit in `seconds`, from the wall time between a probe run's logged steps."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"error: {metrics}: {e.strerror or e}") from None
    rows = [r for r in map(json.loads, lines) if r.get("event") == "train"]
    rows = rows[skip:]
    if len(rows) < 2:
        raise SystemExit(f"error: {metrics}: fewer than 2 timed log lines after the first {skip}")
    per_step = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])
    return max(1, int(seconds / per_step))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="re-encode corpora into parts of at most --part-mb")
    p.add_argument("corpora", nargs="+", help="LibriSpeech-layout folders, CORPUS or CORPUS@HOURS")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kbps", type=float, default=0.0, help="re-encode as Opus at this rate (0: copy)")
    p.add_argument("--part-mb", type=float, default=38.0)
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("wheels", help="download the GPU machine's missing wheels into every part")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("unpack", help="decode every part found into FLAC corpora")
    p.add_argument("kit", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--workers", type=int, default=16)
    p = sub.add_parser("plan", help="print how many steps fit in --seconds")
    p.add_argument("metrics", type=Path, help="a probe run's metrics.jsonl")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--skip", type=int, default=1, help="log lines to skip (start-up)")
    a = ap.parse_args()
    if a.cmd == "pack":
        if a.out.exists() and any(a.out.iterdir()):
            raise SystemExit(f"error: {a.out} is not empty")
        pack(a.corpora, a.out, a.kbps, a.part_mb, a.workers)
    elif a.cmd == "wheels":
        wheels(a.out)
    elif a.cmd == "unpack":
        unpack(a.kit, a.dest, a.workers)
    else:
        print(plan(a.metrics, a.seconds, a.skip))


if __name__ == "__main__":
    main()
