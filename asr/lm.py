"""Word n-gram language models: an interpolated modified Kneser-Ney estimator writing ARPA files.

The beam decoder (asr/beam.py) reads the ARPA file through KenLM; this module builds it, because
KenLM's own estimator (`lmplz`) is not part of any package that installs here. The maths is Chen &
Goodman's interpolated modified Kneser-Ney, the variant KenLM estimates:

- adjusted counts a(g): the raw count for the highest order and for n-grams that start with <s>;
  otherwise the number of distinct words seen to the left of g (the continuation count);
- three discounts per order from the counts of counts of adjusted counts n_k:
  Y = n1 / (n1 + 2 n2), D_k = k - (k + 1) Y n_{k+1} / n_k for k = 1, 2, 3 (3 stands for 3+);
- p(w | h) = (a(hw) - D(a(hw))) / S(h) + gamma(h) p(w | h'), with S(h) = sum_w a(hw),
  gamma(h) = (D1 N1(h) + D2 N2(h) + D3 N3+(h)) / S(h) and h' = h without its first word;
  unigrams interpolate with the uniform distribution over the vocabulary (with <unk>).

Pruning drops n-grams of order >= 2 whose raw count is at most a per-order threshold, keeps every
prefix and suffix of a kept n-gram (ARPA needs them), leaves the kept probabilities as they were and
recomputes each context's back-off weight so that every conditional distribution still sums to one.
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .paths import readable_file

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA's "never": the probability of predicting <s>
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # D1, D2, D3+ when counts of counts cannot give them

NGram = tuple[str, ...]


class LMError(ValueError):
    """An LM file or corpus that cannot be used; the message says why."""


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts of all 1..order-grams of sentences wrapped in <s> ... </s>; index n - 1 is order n."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    counts: list[Counter] = [Counter() for _ in range(order)]
    for words in sentences:
        toks = (BOS, *words, EOS)
        for n in range(1, order + 1):
            c = counts[n - 1]
            for i in range(len(toks) - n + 1):
                c[toks[i:i + n]] += 1
    return counts


def adjusted_counts(counts: list[Counter]) -> list[Counter]:
    """Kneser-Ney adjusted counts per order (see the module docstring)."""
    order = len(counts)
    adjusted = [Counter() for _ in range(order)]
    adjusted[-1] = Counter(counts[-1])
    for n in range(order - 1, 0, -1):  # order n, index n - 1, continuations from order n + 1
        cont = Counter()
        for g in counts[n]:
            cont[g[1:]] += 1
        a = adjusted[n - 1]
        for g, c in counts[n - 1].items():
            a[g] = c if g[0] == BOS else cont[g]
    return adjusted


def discounts(adjusted: Counter, fallback: bool = False) -> tuple[float, float, float]:
    """(D1, D2, D3+) of one order from its counts of counts; raises LMError (or falls back)
    when a count of counts is zero or a discount falls outside [0, k]."""
    coc = Counter(min(a, 5) for a in adjusted.values() if a > 0)
    n = [coc[k] for k in range(1, 5)]
    try:
        y = n[0] / (n[0] + 2 * n[1])
        ds = tuple(k - (k + 1) * y * n[k] / n[k - 1] for k in (1, 2, 3))
    except ZeroDivisionError:
        ds = None
    if ds is None or not all(0 <= d <= k for d, k in zip(ds, (1, 2, 3), strict=True)):
        if fallback:
            return FALLBACK_DISCOUNTS
        raise LMError(f"cannot estimate Kneser-Ney discounts from counts of counts {n} "
                      f"(corpus too small?); allow the fallback discounts {FALLBACK_DISCOUNTS}")
    return ds  # type: ignore[return-value]


@dataclass
class ArpaModel:
    """log10 probabilities and back-off weights per n-gram, order by order (index n - 1)."""

    prob: list[dict[NGram, float]] = field(default_factory=list)  # log10 p(w | h) of h + (w,)
    backoff: list[dict[NGram, float]] = field(default_factory=list)  # log10 bow(h); absent = 0

    @property
    def order(self) -> int:
        return len(self.prob)

    def vocabulary(self) -> list[str]:
        return sorted(g[0] for g in self.prob[0])

    def log10p(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context) with ARPA back-off (context = preceding words, oldest first)."""
        h = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        if (word,) not in self.prob[0]:
            word = UNK
        total = 0.0
        while True:
            g = (*h, word)
            p = self.prob[len(g) - 1].get(g)
            if p is not None:
                return total + p
            total += self.backoff[len(h) - 1].get(h, 0.0)
            h = h[1:]


@dataclass(frozen=True)
class Perplexity:
    """A model's perplexity on held-out sentences (SRILM's convention: OOV words are not scored)."""

    perplexity: float  # 10 ** (-log10 prob / scored tokens)
    log10_prob: float  # summed over the scored tokens
    scored: int  # in-vocabulary words plus one </s> per sentence
    oov: int  # words outside the model's vocabulary, skipped

    @property
    def oov_rate(self) -> float:
        words = self.scored + self.oov
        return self.oov / words if words else 0.0


def perplexity(model: ArpaModel, sentences: Iterable[Sequence[str]]) -> Perplexity:
    """Score each sentence as <s> w1 .. wn </s>: every in-vocabulary word and the closing </s>.

    An OOV word is left unscored (and counted) but stays in the history, where back-off maps it to
    <unk>, so that perplexities of LMs with the same vocabulary compare directly.
    """
    total, scored, oov = 0.0, 0, 0
    for words in sentences:
        history = [BOS]
        for w in (*words, EOS):
            if w != EOS and (w,) not in model.prob[0]:
                oov += 1
            else:
                total += model.log10p(w, history)
                scored += 1
            history.append(w)
    if scored == 0:
        raise LMError("no words to score")
    return Perplexity(10 ** (-total / scored), total, scored, oov)


def estimate(counts: list[Counter], prune: Sequence[int] = (), fallback_discounts: bool = False,
             discount_override: Sequence[tuple[float, float, float]] | None = None) -> ArpaModel:
    """Interpolated modified Kneser-Ney from raw counts, optionally count-pruned.

    Args:
        counts: from `count_ngrams`, orders 1..N.
        prune: per order (1-grams first) drop n-grams with raw count <= this; 1-grams are never
            pruned, missing entries mean 0 (keep all). Thresholds must not decrease with order.
        fallback_discounts: use FALLBACK_DISCOUNTS where the data cannot give discounts.
        discount_override: fixed (D1, D2, D3+) per order instead of estimating them.
    """
    order = len(counts)
    thresholds = [0] + [int(prune[n]) if n < len(prune) else 0 for n in range(1, order)]
    if any(b < a for a, b in zip(thresholds[1:], thresholds[2:], strict=False)):
        raise ValueError(f"pruning thresholds must not decrease with order: {list(prune)}")
    adjusted = adjusted_counts(counts)
    adjusted[0].pop((BOS,), None)  # <s> is never predicted
    ds = [discount_override[n] if discount_override else discounts(adjusted[n], fallback_discounts)
          for n in range(order)]
    vocab = {g[0] for g in counts[0]} - {BOS} | {UNK}

    # interpolated probabilities of every seen n-gram, lowest order first
    prob: list[dict[NGram, float]] = []  # linear probabilities here; log10 at the end
    gamma: list[dict[NGram, float]] = []  # interpolation weight of each context, per order
    for n in range(order):
        d1, d2, d3 = ds[n]
        total: dict[NGram, int] = defaultdict(int)
        mass: dict[NGram, float] = defaultdict(float)
        for g, a in adjusted[n].items():
            h = g[:-1]
            total[h] += a
            mass[h] += d1 if a == 1 else d2 if a == 2 else d3
        gam = {h: mass[h] / total[h] for h in total}
        p: dict[NGram, float] = {}
        if n == 0:
            uniform = gam[()] / len(vocab)
            for g, a in adjusted[0].items():
                p[g] = (a - _discount(a, ds[0])) / total[()] + uniform
            p.setdefault((UNK,), uniform)
        else:
            lower = prob[n - 1]
            for g, a in adjusted[n].items():
                h = g[:-1]
                p[g] = (a - _discount(a, ds[n])) / total[h] + gam[h] * lower[g[1:]]
        prob.append(p)
        gamma.append(gam)

    # count pruning, closed under prefixes and suffixes
    keep: list[set[NGram]] = [set(prob[0])] + [
        {g for g in prob[n] if counts[n][g] > thresholds[n]} for n in range(1, order)]
    for n in range(order - 1, 1, -1):
        for g in keep[n]:
            keep[n - 1].add(g[:-1])
            keep[n - 1].add(g[1:])

    model = ArpaModel()
    for n in range(order):
        model.prob.append({g: math.log10(prob[n][g]) for g in keep[n]})
    model.prob[0][(BOS,)] = LOG10_ZERO
    # back-off weights: bow(h) = (1 - sum_kept p(w|h)) / (1 - sum_kept p(w|h'))
    for n in range(order - 1):  # contexts of order n + 1, predicting order n + 2
        num: dict[NGram, float] = defaultdict(float)
        den: dict[NGram, float] = defaultdict(float)
        for g in keep[n + 1]:
            h = g[:-1]
            num[h] += prob[n + 1][g]
            den[h] += prob[n][g[1:]]
        bows = {}
        for h in num:
            left, right = 1.0 - num[h], 1.0 - den[h]
            if left <= 0.0 or right <= 0.0:  # the kept words hold all the mass: nothing to back off to
                bows[h] = LOG10_ZERO
            else:
                bows[h] = math.log10(left / right)
        model.backoff.append(bows)
    model.backoff.append({})
    return model


def _discount(a: int, ds: tuple[float, float, float]) -> float:
    return ds[0] if a == 1 else ds[1] if a == 2 else ds[2]


def write_arpa(model: ArpaModel, path: str | os.PathLike) -> None:
    """Write ARPA text (gzip-compressed when the name ends in .gz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            f.write("\\data\\\n")
            for n in range(model.order):
                f.write(f"ngram {n + 1}={len(model.prob[n])}\n")
            for n in range(model.order):
                f.write(f"\n\\{n + 1}-grams:\n")
                bows = model.backoff[n]
                for g in sorted(model.prob[n]):
                    line = f"{model.prob[n][g]:.6f}\t{' '.join(g)}"
                    if g in bows:
                        line += f"\t{bows[g]:.6f}"
                    f.write(line + "\n")
            f.write("\n\\end\\\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_text(path: str | os.PathLike):
    path = readable_file(path, "language model file", LMError)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def read_arpa(path: str | os.PathLike) -> ArpaModel:
    """Parse an ARPA file (plain or gzip) into an ArpaModel; raises LMError on a malformed file."""
    model = ArpaModel()
    section = 0
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("ngram ") or line == "\\data\\":
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:-7])
                    while len(model.prob) < section:
                        model.prob.append({})
                        model.backoff.append({})
                    continue
                parts = line.split("\t") if "\t" in line else line.split()
                if section == 0 or len(parts) < 2:
                    raise LMError(f"{path}:{lineno}: not an ARPA n-gram line")
                if "\t" in line:
                    g = tuple(parts[1].split())
                    bow = parts[2] if len(parts) > 2 else None
                else:
                    g = tuple(parts[1:1 + section])
                    bow = parts[1 + section] if len(parts) > 1 + section else None
                if len(g) != section:
                    raise LMError(f"{path}:{lineno}: {len(g)} words in the {section}-gram section")
                model.prob[section - 1][g] = float(parts[0])
                if bow is not None:
                    model.backoff[section - 1][g] = float(bow)
    except UnicodeDecodeError as e:
        raise LMError(f"{path}: not a text ARPA file ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise LMError(f"{path}: unreadable ({e})") from None
    except ValueError as e:
        if isinstance(e, LMError):
            raise
        raise LMError(f"{path}: malformed ARPA file ({e})") from None
    if not model.prob or not model.prob[0]:
        raise LMError(f"{path}: not an ARPA language model (no 1-grams)")
    return model


def arpa_vocabulary(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's 1-gram section, in file order (reads only that section)."""
    words: list[str] = []
    in_unigrams = False
    try:
        with _open_text(path) as f:
            for raw in f:
                line = raw.strip()
                if line == "\\1-grams:":
                    in_unigrams = True
                elif in_unigrams:
                    if not line:
                        continue
                    if line.startswith("\\"):
                        break
                    parts = line.split()
                    if len(parts) < 2:
                        raise LMError(f"{path}: malformed 1-gram line {line!r}")
                    words.append(parts[1])
    except UnicodeDecodeError as e:
        raise LMError(f"{path}: not a text ARPA file ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise LMError(f"{path}: unreadable ({e})") from None
    if not words:
        raise LMError(f"{path}: not an ARPA language model (no 1-grams)")
    return words


def read_sentences(paths: Iterable[str | os.PathLike], exclude: set[str] = frozenset(),
                   lowercase: bool = True) -> Iterable[list[str]]:
    """Words of each non-empty line of the text files, skipping lines in `exclude` (normalised)."""
    from .text import normalize_text

    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                s = normalize_text(line) if lowercase else " ".join(line.split())
                if s and s not in exclude:
                    yield s.split()
