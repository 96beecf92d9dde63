"""Make the two spoken-digit splits of the model card's GRU / LSTM / Elman RNN comparison.

    python benchmarks/digit_splits.py ../shared/data/fsdd OUT

OUT/takes/{train,dev}: dev = takes 5-9 of every speaker and digit (utterance number < 10), train =
the rest. OUT/speaker/{train,dev}: dev = every utterance of speaker 9205, train = the other speakers.
Audio files are copied, transcripts rewritten per chapter, so `asr train` reads them as corpora.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def split_of(uid: str, kind: str) -> str:
    speaker, _, take = uid.split("-")
    if kind == "takes":
        return "dev" if int(take) < 10 else "train"
    return "dev" if speaker == "9205" else "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fsdd", type=Path, help="the fsdd corpus folder")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    counts: dict[tuple[str, str], int] = {}
    transcripts: dict[Path, list[str]] = {}  # written once at the end: a rerun replaces, never appends
    for trans in sorted(args.fsdd.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid = line.split(" ", 1)[0]
            speaker, chapter, _ = uid.split("-")
            for kind in ("takes", "speaker"):
                split = split_of(uid, kind)
                dst = args.out / kind / split / speaker / chapter
                dst.mkdir(parents=True, exist_ok=True)
                for audio in trans.parent.glob(f"{uid}.*"):
                    shutil.copy(audio, dst / audio.name)
                transcripts.setdefault(dst / trans.name, []).append(line)
                counts[(kind, split)] = counts.get((kind, split), 0) + 1
    for path, lines in transcripts.items():
        path.write_text("\n".join(lines) + "\n")
    for (kind, split), n in sorted(counts.items()):
        print(f"{kind:8s} {split:5s} {n:5d} utterances")


if __name__ == "__main__":
    main()
