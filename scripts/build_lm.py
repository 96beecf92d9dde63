"""Build the word n-gram language model shipped as models/lm.arpa.gz.

Interpolated modified Kneser-Ney (asr/lm.py), count-pruned, written as gzip-compressed ARPA, which
KenLM (inside flashlight-text, the beam decoder's library) reads directly. The exact command that
built the shipped file:

    nice -n 19 python scripts/build_lm.py \\
        --text ../shared/data/text/librispeech-train-clean-100.txt \\
        --text ../shared/data/text/gutenberg-sentences.txt \\
        --exclude ../shared/data/librispeech-dev --exclude ../shared/data/synth/LibriSpeech/dev \\
        --exclude-neighbours 120 --order 3 --prune 0 0 1 --out models/lm.arpa.gz

`--exclude` drops every sentence that is a transcript of the given LibriSpeech-layout corpora (the
dev splits used to tune and measure), and `--exclude-neighbours N` also drops the N lines before and
after each of them: the LibriSpeech text is in corpus order, so this holds out the dev speakers'
chapters (the same book passages), as LibriSpeech's own LM corpus holds out dev and test books.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr.lm import LMError, count_ngrams, estimate, write_arpa  # noqa: E402
from asr.text import normalize_text  # noqa: E402


def corpus_transcripts(root: str) -> set[str]:
    texts = set()
    files = list(Path(root).rglob("*.trans.txt"))
    if not files:
        raise SystemExit(f"error: {root}: no *.trans.txt files (not a LibriSpeech-layout corpus)")
    for trans in files:
        for line in trans.read_text(encoding="utf-8").splitlines():
            parts = line.split(" ", 1)
            if len(parts) == 2:
                texts.add(normalize_text(parts[1]))
    return texts


def load_text(paths: list[str], exclude: set[str], neighbours: int) -> tuple[list[list[str]], int]:
    """Normalised sentences of the files, minus excluded ones and their neighbours."""
    sentences, dropped = [], 0
    for p in paths:
        try:
            lines = [normalize_text(x) for x in Path(p).read_text(encoding="utf-8").splitlines()]
        except OSError as e:
            raise SystemExit(f"error: {p}: {e.strerror or e}") from None
        drop = [False] * len(lines)
        for i, s in enumerate(lines):
            if s in exclude:
                for j in range(max(0, i - neighbours), min(len(lines), i + neighbours + 1)):
                    drop[j] = True
        dropped += sum(drop)
        sentences += [s.split() for s, d in zip(lines, drop, strict=True) if s and not d]
    return sentences, dropped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", action="append", required=True, help="text file, one sentence a line")
    ap.add_argument("--exclude", action="append", default=[],
                    help="LibriSpeech-layout corpus whose transcripts must not be in the LM")
    ap.add_argument("--exclude-neighbours", type=int, default=0,
                    help="also drop this many lines before and after each excluded sentence")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--prune", type=int, nargs="*", default=[],
                    help="per order from 1: drop n-grams with raw count <= this (1-grams never)")
    ap.add_argument("--fallback-discounts", action="store_true",
                    help="fixed discounts where counts of counts cannot give them (tiny corpora)")
    ap.add_argument("--out", required=True, help="ARPA file to write (.gz: compressed)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    exclude = set()
    for root in args.exclude:
        exclude |= corpus_transcripts(root)
    sentences, dropped = load_text(args.text, exclude, args.exclude_neighbours)
    n_words = sum(len(s) for s in sentences)
    print(f"{len(sentences)} sentences, {n_words} words ({dropped} lines excluded)", file=sys.stderr)
    counts = count_ngrams(sentences, args.order)
    try:
        model = estimate(counts, args.prune, fallback_discounts=args.fallback_discounts)
    except (LMError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    write_arpa(model, args.out)
    sizes = " ".join(f"{n + 1}-grams {len(p)}" for n, p in enumerate(model.prob))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB): {sizes} "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
