"""Evaluation: corpus WER/CER and S/D/I counts checked against hand-counted edits, alignments,
and `asr evaluate` end to end (a model that knows its corpus scores 0; reports and worst cases)."""

from __future__ import annotations

import json

import jiwer
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import CORPUS

from asr.data import scan_corpus
from asr.evaluate import align_pair, error_counts, utterance_errors
from asr.text import Vocab, normalize_text
from cli import cli

# (ref, hyp, substitutions, deletions, insertions), counted by hand
PAIRS = [
    ("the cat sat on the mat", "the cat sit on mat", 1, 1, 0),  # sat->sit, 'the' dropped
    ("hello world", "hello big world", 0, 0, 1),
    ("a b c d", "", 0, 4, 0),  # nothing recognised
    ("one two", "one two three four", 0, 0, 2),
    ("go forward ten meters", "go toward the meters", 2, 0, 0),
]


def test_word_error_counts_match_hand_counts():
    for ref, hyp, s, d, i in PAIRS:
        c = error_counts([ref], [hyp])
        assert (c.substitutions, c.deletions, c.insertions) == (s, d, i), (ref, hyp)
        assert c.wer == pytest.approx((s + d + i) / len(ref.split()))
        assert utterance_errors(ref, hyp) == s + d + i
    # corpus WER pools the edits over all words (not a mean of per-utterance rates)
    c = error_counts([p[0] for p in PAIRS], [p[1] for p in PAIRS])
    edits = sum(p[2] + p[3] + p[4] for p in PAIRS)
    words = sum(len(p[0].split()) for p in PAIRS)
    assert (c.substitutions, c.deletions, c.insertions) == (3, 5, 3) and c.ref_words == words == 18
    assert c.wer == pytest.approx(edits / words) == pytest.approx(11 / 18)
    assert c.wer == pytest.approx(jiwer.wer([p[0] for p in PAIRS], [p[1] for p in PAIRS]))


def test_character_error_rate_counts_spaces_and_pools_characters():
    c = error_counts(["hello world", "abc"], ["hallo world", "abcd"])
    # 'e'->'a' in 11 characters (the space counts), one inserted 'd' after 3
    assert c.ref_chars == 14 and c.char_errors == 2 and c.cer == pytest.approx(2 / 14)
    assert error_counts(["ab"], ["a b"]).cer == pytest.approx(1 / 2)  # an inserted space


def test_text_is_normalised_on_both_sides():
    c = error_counts(["Don't STOP -- the café, now!"], ["don't stop the cafe now"])
    assert c.wer == 0 and c.cer == 0
    assert error_counts(["THE END"], ["the  end."]).wer == 0


def test_aligned_pair_marks_each_error():
    assert align_pair("the cat sat on the mat", "the cat sit on mat") == (
        "the cat SAT on THE mat",
        "the cat SIT on *** mat")
    assert align_pair("hello world", "hello big world") == ("hello *** world", "hello BIG world")
    top, bottom = align_pair("go forward", "go toward")
    assert top == "go FORWARD" and bottom == "go TOWARD "  # columns line up


def evaluate(*args):
    r = CliRunner().invoke(cli, ["evaluate", *map(str, args)])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r


def test_a_model_that_knows_the_corpus_scores_zero(overfit_models, overfit_corpus, tmp_path):
    report = tmp_path / "report.jsonl"
    r = evaluate("--data", overfit_corpus, "--model", overfit_models["bigru"], "--format", "json",
                 "--report", report)
    summary = json.loads(r.stdout)  # stdout holds the JSON alone
    assert summary["wer"] == 0 and summary["cer"] == 0 and summary["utterances"] == 4
    assert summary["substitutions"] == summary["deletions"] == summary["insertions"] == 0
    utts, _ = scan_corpus(overfit_corpus, Vocab())
    hours = sum(sf.info(u.path).duration for u in utts) / 3600
    assert summary["hours"] == pytest.approx(hours, abs=1e-4)
    assert summary["rtf"] > 0
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(u.id for u in utts)
    assert all(r["errors"] == 0 and r["hyp"] == r["ref"] for r in rows)
    assert r.stderr == ""  # no progress bar when stderr is not a terminal (a log file)


def test_streaming_evaluation_uses_the_streaming_model(overfit_models, overfit_corpus):
    r = evaluate("--data", overfit_corpus, "--model", overfit_models["gru"], "--stream",
                 "--format", "json")
    summary = json.loads(r.stdout)
    assert summary["stream"] is True and summary["utterances"] == 4
    assert summary["wer"] <= 0.05  # learned from these very utterances
    half = json.loads(evaluate("--data", overfit_corpus, "--model", overfit_models["gru"], "--stream",
                               "--precision", "bfloat16", "--format", "json").stdout)
    assert half["precision"] == "bfloat16" and summary["precision"] == "float32"
    assert half["wer"] <= 0.05
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(overfit_corpus), "--model",
                                 str(overfit_models["bigru"]), "--stream"])
    assert r.exit_code == 1 and "unidirectional" in r.output


def test_report_and_worst_utterances_on_unseen_speech(overfit_models, tmp_path):
    """On the whole fixture corpus the model meets 7 utterances it never learned: the report's
    per-utterance errors add up to the corpus counts, and the text output ends with the worst."""
    report = tmp_path / "report.jsonl"
    data = CORPUS / "sphinx"
    summary = json.loads(evaluate("--data", data, "--model", overfit_models["bigru"],
                                  "--format", "json", "--report", report).stdout)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == summary["utterances"] == 11
    for row in rows:
        assert row["ref"] == normalize_text(row["ref"])
        assert row["errors"] == utterance_errors(row["ref"], row["hyp"])
    assert sum(r["errors"] for r in rows) == \
        summary["substitutions"] + summary["deletions"] + summary["insertions"] > 0
    words = sum(len(r["ref"].split()) for r in rows)
    assert summary["ref_words"] == words
    assert summary["wer"] == pytest.approx(sum(r["errors"] for r in rows) / words, abs=1e-5)

    text = evaluate("--data", data, "--model", overfit_models["bigru"], "--worst", "3").stdout
    assert f"WER          {100 * summary['wer']:.2f} %" in text
    tail = text[text.index("worst utterances:"):].splitlines()[1:]
    assert len(tail) == 3 * 3  # id line, REF, HYP for each of the 3 worst
    worst = sorted(rows, key=lambda r: -r["errors"] / len(r["ref"].split()))[0]
    rate = worst["errors"] / len(worst["ref"].split())
    first_id = tail[0].split()[0]
    first = next(r for r in rows if r["id"] == first_id)
    assert first["errors"] / len(first["ref"].split()) == pytest.approx(rate)
    assert (tail[1], tail[2]) == tuple(f"  {tag}: {line}" for tag, line in
                                       zip(("REF", "HYP"), align_pair(first["ref"], first["hyp"]),
                                           strict=True))


def test_sample_scores_the_same_random_subset_every_time(overfit_models, tmp_path):
    data = CORPUS / "sphinx"
    args = ["--data", data, "--model", overfit_models["bigru"], "--format", "json"]
    ids = []
    for i in range(2):
        evaluate(*args, "--sample", "4", "--report", tmp_path / f"{i}.jsonl")
        ids.append([json.loads(line)["id"] for line in (tmp_path / f"{i}.jsonl").read_text().splitlines()])
    assert len(ids[0]) == 4 and ids[0] == ids[1]
    evaluate(*args, "--report", tmp_path / "all.jsonl")
    rows = {json.loads(line)["id"]: line for line in (tmp_path / "all.jsonl").read_text().splitlines()}
    assert len(rows) == 11 and set(ids[0]) < set(rows)  # a subset of the corpus, scored alike
    sampled = (tmp_path / "0.jsonl").read_text().splitlines()
    assert sampled == [rows[i] for i in ids[0]]
    assert json.loads(evaluate(*args, "--sample", "50").stdout)["utterances"] == 11  # N > corpus: all


@pytest.mark.parametrize("stream", [False, True])
def test_corrupt_audio_in_the_corpus_is_a_one_line_error(overfit_models, overfit_corpus, tmp_path,
                                                         stream):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(overfit_corpus, corpus)
    victim = sorted(corpus.rglob("*.flac"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # header intact (the corpus scan passes), audio cut
    model = overfit_models["gru" if stream else "bigru"]
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(corpus), "--model", str(model),
                                 *(["--stream"] if stream else [])])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # a clean exit, not an escaped exception
    last = r.stderr.strip().splitlines()[-1]
    assert victim.name in last and "cannot decode audio" in last, r.stderr


def test_report_that_cannot_be_written_is_a_one_line_error(overfit_models, overfit_corpus, tmp_path):
    report = tmp_path / "no-such-folder" / "report.jsonl"
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(overfit_corpus), "--model",
                                 str(overfit_models["bigru"]), "--report", str(report)])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: --report {report}: cannot write")
