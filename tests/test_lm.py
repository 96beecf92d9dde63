"""The modified Kneser-Ney estimator: hand-computed toy probabilities, normalisation, pruning, ARPA."""

import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from asr.lm import (
    BOS,
    EOS,
    UNK,
    LMError,
    adjusted_counts,
    arpa_vocabulary,
    count_ngrams,
    discounts,
    estimate,
    perplexity,
    read_arpa,
    write_arpa,
)

TOY = [["a", "b"], ["a", "c"], ["b", "a"]]  # <s> a b </s> / <s> a c </s> / <s> b a </s>
FIXED = (0.5, 1.0, 1.5)


def test_adjusted_counts_by_hand():
    adj = adjusted_counts(count_ngrams(TOY, 3))
    # unigrams: distinct left neighbours; a <- {<s>, b}, b <- {<s>, a}, c <- {a}, </s> <- {b, c, a}
    assert {g: adj[0][g] for g in [("a",), ("b",), ("c",), (EOS,)]} == {
        ("a",): 2, ("b",): 2, ("c",): 1, (EOS,): 3}
    # bigrams starting with <s> keep their raw counts, the others count left neighbours
    assert adj[1][(BOS, "a")] == 2 and adj[1][(BOS, "b")] == 1
    assert adj[1][("a", "b")] == 1 and adj[1][("a", EOS)] == 1
    # the highest order keeps raw counts
    assert adj[2] == count_ngrams(TOY, 3)[2]


def test_discounts_from_counts_of_counts():
    # n1 = 4, n2 = 2, n3 = 1, n4 = 1 -> Y = 4 / 8; D1 = 1 - 2Y(2/4), D2 = 2 - 3Y(1/2), D3 = 3 - 4Y(1/1)
    adj = Counter({("w1",): 1, ("w2",): 1, ("w3",): 1, ("w4",): 1, ("w5",): 2, ("w6",): 2,
                   ("w7",): 3, ("w8",): 4})
    assert discounts(adj) == pytest.approx((0.5, 1.25, 1.0))
    with pytest.raises(LMError, match="discounts"):
        discounts(Counter({("x",): 1}))
    assert discounts(Counter({("x",): 1}), fallback=True) == FIXED


def test_bigram_probabilities_by_hand():
    m = estimate(count_ngrams(TOY, 2), discount_override=[FIXED, FIXED])
    p = {g: 10 ** lp for g, lp in m.prob[0].items()}
    # unigram: continuation counts a 2, b 2, c 1, </s> 3 (sum 8); gamma = (1 + 1 + 0.5 + 1.5) / 8
    # = 0.5 spread uniformly over 5 words (a, b, c, </s>, <unk>)
    assert p[("a",)] == pytest.approx(1 / 8 + 0.1)
    assert p[("b",)] == pytest.approx(1 / 8 + 0.1)
    assert p[("c",)] == pytest.approx(0.5 / 8 + 0.1)
    assert p[(EOS,)] == pytest.approx(1.5 / 8 + 0.1)
    assert p[(UNK,)] == pytest.approx(0.1)
    assert m.prob[0][(BOS,)] == -99.0
    b = {g: 10 ** lp for g, lp in m.prob[1].items()}
    # context <s>: raw counts a 2, b 1 (sum 3), gamma = (1.0 + 0.5) / 3 = 0.5
    assert b[(BOS, "a")] == pytest.approx((2 - 1.0) / 3 + 0.5 * 0.225)
    assert b[(BOS, "b")] == pytest.approx((1 - 0.5) / 3 + 0.5 * 0.225)
    # context a: b, c, </s> once each, gamma = 1.5 / 3
    assert b[("a", "c")] == pytest.approx(0.5 / 3 + 0.5 * 0.1625)
    assert b[("a", EOS)] == pytest.approx(0.5 / 3 + 0.5 * 0.2875)
    # context c: </s> once, gamma = 0.5 / 1
    assert b[("c", EOS)] == pytest.approx(0.5 + 0.5 * 0.2875)
    # unpruned, every back-off weight is the interpolation weight gamma(h) = 0.5
    assert {h: 10 ** w for h, w in m.backoff[0].items()} == pytest.approx(
        {(BOS,): 0.5, ("a",): 0.5, ("b",): 0.5, ("c",): 0.5})
    # an unseen bigram backs off: p(c | <s>) = bow(<s>) p(c)
    assert 10 ** m.log10p("c", [BOS]) == pytest.approx(0.5 * 0.1625)
    assert 10 ** m.log10p("zebra", ["a"]) == pytest.approx(0.5 * 0.1)  # -> <unk>


def test_perplexity_by_hand_with_oov_words_skipped():
    m = estimate(count_ngrams(TOY, 2), discount_override=[FIXED, FIXED])
    # p(a | <s>) p(c | a) p(</s> | c), from the hand-computed bigrams above
    probs = [(2 - 1.0) / 3 + 0.5 * 0.225, 0.5 / 3 + 0.5 * 0.1625, 0.5 + 0.5 * 0.2875]
    r = perplexity(m, [["a", "c"]])
    assert (r.scored, r.oov) == (3, 0)
    assert r.perplexity == pytest.approx(math.prod(probs) ** (-1 / 3))
    # "zebra" is not scored; </s> after it backs off to the unigram p(</s>) = 0.2875
    r = perplexity(m, [["a", "c"], ["a", "zebra"]])
    assert (r.scored, r.oov) == (5, 1) and r.oov_rate == pytest.approx(1 / 6)
    assert r.log10_prob == pytest.approx(math.log10(math.prod(probs) * probs[0] * 0.2875))
    with pytest.raises(LMError, match="no words"):
        perplexity(m, [])


def _random_corpus(n_sentences=400, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    weights = [1 / (i + 1) for i in range(200)]  # Zipf-like, so counts of counts are all non-zero
    return [rng.choices(words, weights, k=rng.randint(1, 8)) for _ in range(n_sentences)]


def _assert_normalised(m, contexts):
    vocab = [w for w in m.vocabulary() if w != BOS]
    for h in contexts:
        total = sum(10 ** m.log10p(w, h) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-9), (h, total)


@pytest.mark.parametrize("prune", [(), (0, 0, 1), (0, 1, 2)])
def test_trigram_distributions_sum_to_one(prune):
    corpus = _random_corpus()
    counts = count_ngrams(corpus, 3)
    m = estimate(counts, prune)
    contexts = [(), (BOS,), ("w0",), ("w29",), ("never",), (BOS, "w0"), ("w1", "w0"),
                ("w3", "w7"), ("w28", "w29"), ("w199",)] + [g for g in list(m.prob[1])[:40] if g[-1] != EOS]
    _assert_normalised(m, contexts)


def test_pruning_keeps_probabilities_and_closes_prefixes():
    counts = count_ngrams(_random_corpus(), 3)
    full, pruned = estimate(counts), estimate(counts, (0, 1, 1))
    assert len(pruned.prob[2]) < len(full.prob[2]) and len(pruned.prob[1]) < len(full.prob[1])
    for n in (1, 2):
        for g, lp in pruned.prob[n].items():
            assert lp == pytest.approx(full.prob[n][g])  # kept entries keep their probability
            assert g[:-1] in pruned.prob[n - 1] and g[1:] in pruned.prob[n - 1]
    assert all(counts[2][g] > 1 for g in pruned.prob[2])
    for g in pruned.prob[1]:  # a rare bigram survives only as the prefix or suffix of a trigram
        assert counts[1][g] > 1 or any(g in (h[:-1], h[1:]) for h in pruned.prob[2])
    with pytest.raises(ValueError, match="must not decrease"):
        estimate(counts, (0, 2, 1))


def test_arpa_round_trip_gzip(tmp_path):
    m = estimate(count_ngrams(_random_corpus(), 3), (0, 0, 1))
    path = tmp_path / "lm.arpa.gz"
    write_arpa(m, path)
    back = read_arpa(path)
    assert back.order == 3
    for n in range(3):
        assert back.prob[n].keys() == m.prob[n].keys()
        assert all(abs(back.prob[n][g] - lp) < 1e-6 for g, lp in m.prob[n].items())
        assert all(abs(back.backoff[n][g] - w) < 1e-6 for g, w in m.backoff[n].items())
    assert set(arpa_vocabulary(path)) == set(m.vocabulary())
    assert [p.name for p in tmp_path.iterdir()] == ["lm.arpa.gz"]  # no temporary left behind


def test_kenlm_reads_our_arpa_with_the_same_scores(tmp_path):
    """The decoder's LM library sees exactly the probabilities we estimated."""
    import flashlight.lib.text.decoder.kenlm as kenlm  # a required dependency: no skip
    from flashlight.lib.text.dictionary import Dictionary

    m = estimate(count_ngrams(_random_corpus(), 3), (0, 0, 1))
    path = tmp_path / "lm.arpa"
    write_arpa(m, path)
    words = m.vocabulary()
    d = Dictionary()
    for w in words:
        d.add_entry(w)
    lm = kenlm.KenLM(str(path), d)
    state = lm.start(False)
    history: list[str] = [BOS]
    for w in ["w0", "w3", "w1", "w0", "w17"]:
        state, score = lm.score(state, d.get_index(w))
        assert score == pytest.approx(m.log10p(w, history), abs=1e-5)
        history.append(w)
    _, score = lm.finish(state)
    assert score == pytest.approx(m.log10p(EOS, history), abs=1e-5)


@pytest.mark.parametrize("content, message", [
    (b"", "language model file is empty"),
    (b"\\data\\\nngram 1=1\n\n\\1-grams:\nnot-a-number\n", "ARPA"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "ARPA"),
])
def test_bad_arpa_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.arpa"
    path.write_bytes(content)
    with pytest.raises(LMError, match=message):
        read_arpa(path)
    with pytest.raises(LMError):
        arpa_vocabulary(path)
    with pytest.raises(LMError, match="no such"):
        read_arpa(tmp_path / "missing.arpa")


def test_build_script_writes_a_loadable_lm(tmp_path):
    text = tmp_path / "text.txt"
    dev = tmp_path / "dev" / "1" / "2"
    dev.mkdir(parents=True)
    lines = [" ".join(s).upper() for s in _random_corpus(600, seed=1)]
    lines[10] = "W5 W9 W2 W7 W1 W3 W8 W4 W6"  # the held-out dev sentence, unique
    text.write_text("\n".join(lines) + "\n")
    (dev / "1-2.trans.txt").write_text(f"1-2-0000 {lines[10]}\n")
    out = tmp_path / "lm.arpa.gz"
    r = subprocess.run([sys.executable, "scripts/build_lm.py", "--text", str(text),
                        "--exclude", str(tmp_path / "dev"), "--exclude-neighbours", "2",
                        "--order", "3", "--prune", "0", "0", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=str(_root()))
    assert r.returncode == 0, r.stderr
    assert "5 lines excluded" in r.stderr
    m = read_arpa(out)
    assert m.order == 3 and math.isclose(sum(10 ** m.log10p(w) for w in m.vocabulary()
                                             if w != BOS), 1.0, abs_tol=1e-5)


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent
