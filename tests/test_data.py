"""Corpora: scanning LibriSpeech layouts, the manifest cache, problem reports, batches, augmentation.

Fake corpora are built in tmp_path from the committed real recordings in tests/fixtures.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from conftest import CORPUS

import asr.data
from asr.audio import load_audio
from asr.data import (
    AugmentConfig,
    CorpusError,
    DurationBatchSampler,
    SpeechDataset,
    augment_config,
    load_corpora,
    parse_augment_kinds,
    perturb_wave,
    scan_corpora,
    scan_corpus,
    spec_augment,
)
from asr.features import FeatureConfig, FeatureStats, _mel_transform, log_mel, warped_mel_fbank
from asr.text import Vocab
from cli import cli

SPHINX = CORPUS / "sphinx"
CARDS = SPHINX / "9301" / "1"  # five short real clips
CARD_TEXT = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1]
             for ln in (CARDS / "9301-1.trans.txt").read_text().splitlines()}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASR_CACHE_DIR", str(tmp_path / "cache"))


def write_audio(src: Path, dst: Path) -> None:
    """Copy a fixture recording into `dst`, converting it to the format its extension names."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == src.suffix:
        shutil.copy(src, dst)
        return
    wave, sr = sf.read(str(src), dtype="float32")
    fmt = {".wav": ("WAV", "PCM_16"), ".ogg": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS"),
           ".mp3": ("MP3", "MPEG_LAYER_III"), ".flac": ("FLAC", "PCM_16")}[dst.suffix]
    sf.write(str(dst), wave, sr, format=fmt[0], subtype=fmt[1])


def chapter(root: Path, speaker: str, chap: str, lines: list[str], audio: dict[str, str]) -> Path:
    """One LibriSpeech chapter folder: `lines` into SPEAKER-CHAPTER.trans.txt, and for each
    utterance id in `audio` a copy of the 9301-1 fixture clip named by its value (e.g. '0001.wav')."""
    d = root / speaker / chap
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{speaker}-{chap}.trans.txt").write_text("".join(ln + "\n" for ln in lines))
    for uid, src in audio.items():
        stem, ext = src.split(".")
        write_audio(CARDS / f"9301-1-{stem}.flac", d / f"{uid}.{ext}")
    return d


def test_scan_finds_every_format_at_any_depth(tmp_path):
    root = tmp_path / "corpus"
    deep = root / "LibriSpeech" / "train-clean-100"
    chapter(deep, "11", "1", ["11-1-0001 TEN OF CLUBS", "11-1-0002 FOUR QUEEN OF CLUBS"],
            {"11-1-0001": "0001.flac", "11-1-0002": "0002.wav"})
    chapter(root / "more" / "nested" / "here", "12", "7",
            ["12-7-0003 SEVEN OF CLUBS", "12-7-0004 FIVE FIVE", "12-7-0005 Eight of spades, four!"],
            {"12-7-0003": "0003.ogg", "12-7-0004": "0004.opus", "12-7-0005": "0005.mp3"})
    utts, problems = scan_corpus(root, Vocab())
    assert problems == []
    by_id = {u.id: u for u in utts}
    assert sorted(by_id) == ["11-1-0001", "11-1-0002", "12-7-0003", "12-7-0004", "12-7-0005"]
    assert by_id["12-7-0005"].text == "eight of spades four"  # normalised once, for targets and WER
    assert by_id["11-1-0002"].text == "four queen of clubs"
    for u in utts:
        assert Path(u.path).is_absolute() and Path(u.path).exists()
        info = sf.info(u.path)
        assert u.duration == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        # the manifest points at decodable audio of the stated length
        assert len(load_audio(u.path)) / 16000 == pytest.approx(u.duration, abs=0.1)
    assert by_id["11-1-0002"].trans.endswith("11-1.trans.txt") and by_id["11-1-0002"].line == 2


def test_manifest_cache_is_used_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    d = chapter(root, "11", "1", ["11-1-0001 TEN OF CLUBS", "11-1-0003 SEVEN OF CLUBS"],
                {"11-1-0001": "0001.flac", "11-1-0003": "0003.flac"})
    builds = []
    real_build = asr.data._build_entries
    monkeypatch.setattr(asr.data, "_build_entries",
                        lambda *a: builds.append(1) or real_build(*a))

    def scan():
        utts, problems = scan_corpus(root, Vocab())
        assert problems == []
        return {u.id: u for u in utts}

    first = scan()
    assert len(builds) == 1 and list((tmp_path / "cache").rglob("*.json"))
    assert scan() == first and len(builds) == 1  # unchanged corpus: the cached manifest

    # a new utterance (audio + transcript line)
    write_audio(CARDS / "9301-1-0004.flac", d / "11-1-0004.flac")
    (d / "11-1.trans.txt").write_text((d / "11-1.trans.txt").read_text() + "11-1-0004 FIVE FIVE\n")
    assert sorted(scan()) == ["11-1-0001", "11-1-0003", "11-1-0004"] and len(builds) == 2

    # a changed transcript
    (d / "11-1.trans.txt").write_text("11-1-0001 TEN OF HEARTS\n11-1-0003 SEVEN OF CLUBS\n"
                                      "11-1-0004 FIVE FIVE\n")
    assert scan()["11-1-0001"].text == "ten of hearts" and len(builds) == 3

    # replaced audio: the duration follows the new file
    before = scan()["11-1-0003"].duration
    write_audio(CARDS / "9301-1-0005.flac", d / "11-1-0003.flac")
    after = scan()["11-1-0003"].duration
    assert len(builds) == 4 and after == pytest.approx(sf.info(str(CARDS / "9301-1-0005.flac")).duration)
    assert after != pytest.approx(before)

    # a removed utterance
    (d / "11-1-0004.flac").unlink()
    (d / "11-1.trans.txt").write_text("11-1-0001 TEN OF HEARTS\n11-1-0003 SEVEN OF CLUBS\n")
    assert sorted(scan()) == ["11-1-0001", "11-1-0003"] and len(builds) == 5


def bad_corpus(root: Path) -> Path:
    chapter(root, "11", "1", [
        "11-1-0001 TEN OF CLUBS",          # 1: fine
        "11-1-0009 NINE OF CLUBS",         # 2: no audio
        "this line is not an utterance",   # 3: malformed
        "11-1-0003 SEVEN OF 7 CLUBS",      # 4: '7' is not in the vocabulary
        "11-1-0001 TEN OF CLUBS AGAIN",    # 5: duplicate id
        "11-1-0004",                       # 6: id without text (malformed)
        "11-1-0005 FIVE FIVE",             # 7: two audio files for one id
    ], {"11-1-0001": "0001.flac", "11-1-0002": "0002.flac", "11-1-0003": "0003.flac",
        "11-1-0005": "0005.flac"})
    write_audio(CARDS / "9301-1-0005.flac", root / "11" / "1" / "11-1-0005.wav")
    chapter(root, "12", "1", ["12-1-0001 SEVEN OF CLUBS"], {"12-1-0001": "0003.flac"})
    return root


def test_problems_are_reported_with_file_and_line(tmp_path):
    root = bad_corpus(tmp_path / "corpus")
    trans = str((root / "11" / "1" / "11-1.trans.txt").resolve())
    utts, problems = scan_corpus(root, Vocab())
    assert sorted(u.id for u in utts) == ["11-1-0001", "12-1-0001"]
    found = {(p.file, p.line): p.message for p in problems}
    assert "no audio" in found[(trans, 2)]
    assert "malformed" in found[(trans, 3)]
    assert "'7'" in found[(trans, 4)] and "vocabulary" in found[(trans, 4)]
    assert "duplicate utterance id 11-1-0001" in found[(trans, 5)] and f"{trans}:1" in found[(trans, 5)]
    assert "malformed" in found[(trans, 6)]
    assert "11-1-0005.flac" in found[(trans, 7)] and "11-1-0005.wav" in found[(trans, 7)]
    audio_only = str((root / "11" / "1" / "11-1-0002.flac").resolve())
    assert "no transcript line" in found[(audio_only, 0)]
    assert len(problems) == 7
    # the one-line form used in messages: FILE:LINE: message
    assert f"{trans}:4: " in "\n".join(str(p) for p in problems)


def test_load_corpora_stops_on_problems_unless_skip_bad(tmp_path):
    bad = bad_corpus(tmp_path / "bad")
    good = tmp_path / "good"
    chapter(good, "13", "1", ["13-1-0001 TEN OF CLUBS"], {"13-1-0001": "0001.flac"})
    with pytest.raises(CorpusError) as e:
        load_corpora([str(good), str(bad)], Vocab(), skip_bad=False)
    lines = str(e.value).splitlines()
    assert "7 corpus problem(s)" in lines[0] and "--skip-bad" in lines[0]
    assert len(lines) == 1 + 7  # one line per problem
    utts, skipped = load_corpora([str(good), str(bad)], Vocab(), skip_bad=True)
    assert sorted(u.id for u in utts) == ["11-1-0001", "12-1-0001", "13-1-0001"] and skipped == 7


def test_an_id_in_two_corpora_of_one_set_is_a_duplicate(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    chapter(a, "11", "1", ["11-1-0001 TEN OF CLUBS"], {"11-1-0001": "0001.flac"})
    chapter(b, "11", "1", ["11-1-0001 FOUR QUEEN OF CLUBS", "11-1-0003 SEVEN OF CLUBS"],
            {"11-1-0001": "0002.flac", "11-1-0003": "0003.flac"})
    groups, problems = scan_corpora([str(a), str(b)], Vocab())
    assert [[u.id for u in g] for g in groups] == [["11-1-0001"], ["11-1-0003"]]
    [p] = problems
    assert p.file == str((b / "11" / "1" / "11-1.trans.txt").resolve()) and p.line == 1
    assert str((a / "11" / "1" / "11-1.trans.txt").resolve()) + ":1" in p.message


def test_missing_folder_and_folder_without_transcripts(tmp_path):
    (tmp_path / "empty").mkdir()
    groups, problems = scan_corpora([str(tmp_path / "nope"), str(tmp_path / "empty")], Vocab())
    assert groups == [[], []]
    assert "does not exist" in problems[0].message and "no *.trans.txt" in problems[1].message


def test_cli_train_and_evaluate_stop_on_a_bad_corpus(tmp_path, tiny_checkpoint):
    bad = bad_corpus(tmp_path / "bad")
    r = CliRunner().invoke(cli, ["train", "--train", str(bad), "--out", str(tmp_path / "run"),
                                 "--hidden-size", "32", "--num-layers", "1", "--max-steps", "1"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert "7 corpus problem(s)" in r.output and "11-1.trans.txt:4:" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(bad), "--model", str(tiny_checkpoint)])
    assert r.exit_code == 1 and "7 corpus problem(s)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(bad), "--model", str(tiny_checkpoint),
                                 "--skip-bad", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert '"utterances": 2' in r.stdout and '"skipped": 7' in r.stdout


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from asr.checkpoint import atomic_save, make_checkpoint
    from asr.model import CTCModel, ModelConfig

    torch.manual_seed(0)
    model = CTCModel(ModelConfig(hidden_size=16, num_layers=1, conv_channels=4))
    stats = FeatureStats(mean=torch.full((80,), -8.0), std=torch.full((80,), 3.0))
    path = tmp_path / "tiny.pt"
    atomic_save(make_checkpoint(model, FeatureConfig(), stats, Vocab()), path)
    return path


# ----------------------------------------------------------------------------- batches


DURATIONS = [1.0, 1.2, 3.5, 0.8, 2.2, 2.9, 1.7, 0.6, 4.1, 1.1, 2.4, 0.9, 3.3]


def test_batches_are_deterministic_full_and_within_budget():
    s = DurationBatchSampler(DURATIONS, batch_seconds=6.0, seed=3)
    e0, e0_again, e1 = s.epoch_batches(0), s.epoch_batches(0), s.epoch_batches(1)
    assert e0 == e0_again and e0 != e1  # a pure function of (seed, epoch), reshuffled per epoch
    assert DurationBatchSampler(DURATIONS, 6.0, seed=4).epoch_batches(0) != e0
    for batches in (e0, e1):
        ids = sorted(i for b in batches for i, _ in b)
        assert ids == list(range(len(DURATIONS)))  # every utterance exactly once
        for b in batches:  # padded duration within the budget (one long utterance may exceed it)
            durs = [DURATIONS[i] for i, _ in b]
            assert max(durs) * len(b) <= 6.0 or len(b) == 1
    seeds = [seed for b in e0 for _, seed in b]
    assert len(set(seeds)) == len(seeds)  # one augmentation seed per item
    assert all(seed is None for b in DurationBatchSampler(DURATIONS, 6.0, augment=False).epoch_batches(0)
               for _, seed in b)


def test_weights_repeat_utterances():
    s = DurationBatchSampler([1.0, 1.0, 1.0], batch_seconds=2.0, weights=[2.0, 1.0, 0.0])
    ids = sorted(i for b in s.epoch_batches(0) for i, _ in b)
    assert ids == [0, 0, 1]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_equal_shards_covering_the_epoch(world):
    ranks = [DurationBatchSampler(DURATIONS, 6.0, seed=1, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        shards = [s.rank_batches(epoch) for s in ranks]
        assert len({len(b) for b in shards}) == 1  # same number of steps on every rank
        ids = sorted(i for shard in shards for b in shard for i, _ in b)
        assert ids == list(range(len(DURATIONS)))


def test_resume_skips_the_batches_already_trained():
    s = DurationBatchSampler(DURATIONS, 6.0, seed=2)
    full = list(s)
    s.set_epoch(0, skip=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_evaluation_features_are_clean():
    path = str(CARDS / "9301-1-0005.flac")
    wave = load_audio(path)
    aug = AugmentConfig(noise_prob=1.0)
    a = perturb_wave(wave, aug, torch.Generator().manual_seed(5))
    b = perturb_wave(wave, aug, torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a, b)
    lengths = {len(perturb_wave(wave, aug, torch.Generator().manual_seed(s))) for s in range(30)}
    # speed perturbation 0.9 / 1.0 / 1.1 resamples the waveform
    assert {round(n / len(wave), 2) for n in lengths} == {0.91, 1.0, 1.11}
    feats = torch.randn(500, 80)
    masked = spec_augment(feats, AugmentConfig(), torch.Generator().manual_seed(0))
    zero_cols = (masked == 0).all(0).sum()
    zero_rows = (masked == 0).all(1).sum()
    assert zero_cols > 0 and zero_rows > 0 and zero_rows <= 0.2 * 500

    stats = FeatureStats(mean=torch.full((80,), -8.0), std=torch.full((80,), 3.0))
    utts, _ = scan_corpus(CARDS.parent.parent, Vocab())
    idx = next(i for i, u in enumerate(utts) if u.id == "9301-1-0005")
    clean = SpeechDataset(utts, Vocab(), FeatureConfig(), stats, augment=None)
    train = SpeechDataset(utts, Vocab(), FeatureConfig(), stats, augment=AugmentConfig())
    expected = stats.normalize(log_mel(wave))
    torch.testing.assert_close(clean.features(idx, seed=123), expected)
    torch.testing.assert_close(train.features(idx, seed=None), expected)  # no seed: evaluation item
    assert not torch.equal(train.features(idx, seed=123), expected)
    torch.testing.assert_close(train.features(idx, seed=123), train.features(idx, seed=123))
    feats, targets, uid = train[(idx, 7)]
    assert uid == "9301-1-0005" and Vocab().decode(targets.tolist()) == CARD_TEXT[uid].lower()


def test_augmentations_can_be_chosen_one_by_one():
    assert parse_augment_kinds("speed, SpecAugment") == ("speed", "specaugment")
    assert parse_augment_kinds("none") == () and augment_config(()) is None
    with pytest.raises(ValueError, match="'reverb'"):
        parse_augment_kinds("speed,reverb")
    wave = load_audio(str(CARDS / "9301-1-0005.flac"))
    speed_only = augment_config(("speed",))
    outs = [perturb_wave(wave, speed_only, torch.Generator().manual_seed(s)) for s in range(30)]
    # no gain, no noise: a seed that keeps the speed leaves the waveform as it was
    same = [o for o in outs if len(o) == len(wave)]
    assert same and all(np.array_equal(o, wave) for o in same)
    assert {len(o) for o in outs} - {len(wave)}  # but the speed still changes
    assert not speed_only.masks
    feats = torch.randn(500, 80)
    masks_only = augment_config(("specaugment",))
    assert len(perturb_wave(wave, masks_only, torch.Generator().manual_seed(1))) == len(wave)
    masked = spec_augment(feats, masks_only, torch.Generator().manual_seed(0))
    assert (masked == 0).all(0).any() and (masked == 0).all(1).any()
    no_time = replace(masks_only, time_masks=0)
    assert not (spec_augment(feats, no_time, torch.Generator().manual_seed(0)) == 0).all(1).any()
    freq_only = augment_config(("speed", "freqmask"))  # SpecAugment's frequency masks alone
    assert freq_only.freq_masks == masks_only.freq_masks > 0 and freq_only.time_masks == 0
    assert augment_config(("specaugment", "freqmask")) == masks_only
    for seed in range(5):
        masked = spec_augment(feats, freq_only, torch.Generator().manual_seed(seed))
        assert not (masked == 0).all(1).any()  # no frame blanked out
        zero_bins = (masked == 0).all(0)
        assert zero_bins.sum() <= freq_only.freq_masks * freq_only.freq_mask_bins
        torch.testing.assert_close(masked[:, ~zero_bins], feats[:, ~zero_bins])
    assert any((spec_augment(feats, freq_only, torch.Generator().manual_seed(s)) == 0).all(0).any()
               for s in range(5))


def _mel_centroid(feats: torch.Tensor) -> float:
    """Power-weighted mean mel bin of un-normalised log-mel features."""
    power = feats.exp()
    return float((power * torch.arange(feats.shape[1])).sum() / power.sum())


def test_vtlp_moves_the_spectrum_and_leaves_the_other_draws_alone():
    cfg = FeatureConfig()
    wave = load_audio(str(CARDS / "9301-1-0005.flac"))
    torch.testing.assert_close(warped_mel_fbank(cfg, 1.0), _mel_transform(cfg).mel_scale.fb.float())
    clean = log_mel(wave, cfg)
    # alpha > 1 reads each filter lower in the input spectrum: formants move up, as for a shorter tract
    up, down = log_mel(wave, cfg, vtlp=1.1), log_mel(wave, cfg, vtlp=0.9)
    assert up.shape == down.shape == clean.shape
    assert _mel_centroid(down) + 0.3 < _mel_centroid(clean) < _mel_centroid(up) - 0.3
    torch.testing.assert_close(log_mel(wave, cfg, vtlp=1.0 + 1e-9), clean, atol=1e-3, rtol=0)

    assert augment_config(("speed", "gain")).vtlp == 0 and augment_config(("vtlp",)).vtlp > 0
    utts, _ = scan_corpus(CARDS.parent.parent, Vocab())
    idx = next(i for i, u in enumerate(utts) if u.id == "9301-1-0005")
    plain = SpeechDataset(utts, Vocab(), cfg, None, augment=augment_config(("speed", "gain")))
    warped = SpeechDataset(utts, Vocab(), cfg, None, augment=augment_config(("speed", "gain", "vtlp")))
    for seed in range(6):  # the warp is drawn last: speed and gain are the same draws as without it
        a, b = plain.features(idx, seed), warped.features(idx, seed)
        assert a.shape == b.shape and not torch.equal(a, b)
        assert abs(float(a.mean() - b.mean())) < 0.5
    only = SpeechDataset(utts, Vocab(), cfg, None, augment=augment_config(("vtlp",)))
    warps = {round(_mel_centroid(only.features(idx, s)) - _mel_centroid(clean), 2) for s in range(8)}
    assert len(warps) == 8 and min(warps) < 0 < max(warps)  # a new factor per draw, both ways


def damaged_corpus(root: Path) -> tuple[Path, Path]:
    """Three good clips, one too short to transcribe (its header shows it) and one truncated past
    its header (only decoding finds it)."""
    chapter(root, "14", "1", [f"14-1-000{i} {CARD_TEXT[f'9301-1-000{i}']}" for i in (1, 2, 3, 4, 5)],
            {f"14-1-000{i}": f"000{i}.flac" for i in (1, 2, 3, 4, 5)})
    short = root / "14" / "1" / "14-1-0004.flac"
    sf.write(str(short), np.zeros(300, np.float32), 16000)  # 19 ms
    cut = root / "14" / "1" / "14-1-0005.flac"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 5])
    return short, cut


def test_too_short_audio_is_a_corpus_problem_found_by_the_scan(tmp_path):
    short, _ = damaged_corpus(tmp_path / "c")
    utts, problems = scan_corpus(tmp_path / "c", Vocab())
    assert sorted(u.id for u in utts) == ["14-1-0001", "14-1-0002", "14-1-0003", "14-1-0005"]
    [p] = problems
    assert p.message == f"{short.resolve()}: too short (19 ms; need at least 50 ms)" and p.line == 4


def test_cli_evaluate_skip_bad_skips_audio_that_fails_to_decode(tmp_path, tiny_checkpoint):
    from asr.checkpoint import atomic_save, make_checkpoint
    from asr.model import CTCModel, ModelConfig

    _, cut = damaged_corpus(tmp_path / "c")
    streaming = tmp_path / "tiny-stream.pt"
    model = CTCModel(ModelConfig(bidirectional=False, hidden_size=16, num_layers=1, conv_channels=4))
    stats = FeatureStats(mean=torch.full((80,), -8.0), std=torch.full((80,), 3.0))
    atomic_save(make_checkpoint(model, FeatureConfig(), stats, Vocab()), streaming)
    base = ["evaluate", "--data", str(tmp_path / "c"), "--decoder", "greedy", "--format", "json"]
    r = CliRunner().invoke(cli, [*base, "--model", str(tiny_checkpoint)])
    assert r.exit_code == 1 and "1 corpus problem(s)" in r.stderr and "too short" in r.stderr
    for how in (["--model", str(tiny_checkpoint)], ["--model", str(streaming), "--stream"]):
        r = CliRunner().invoke(cli, [*base, "--skip-bad", *how])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        assert summary["utterances"] == 3 and summary["skipped"] == 2
        assert summary["ref_words"] == sum(len(CARD_TEXT[f"9301-1-000{i}"].split()) for i in (1, 2, 3))
        [note] = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped")]
        assert note.startswith("skipped 1 utterance(s) whose audio failed to decode (--skip-bad), "
                               f"e.g. {cut.resolve()}: cannot decode audio")
    # only the truncated file left: without --skip-bad one line naming it
    (tmp_path / "c" / "14" / "1" / "14-1-0004.flac").unlink()
    trans = tmp_path / "c" / "14" / "1" / "14-1.trans.txt"
    trans.write_text("".join(ln + "\n" for ln in trans.read_text().splitlines() if "14-1-0004" not in ln))
    r = CliRunner().invoke(cli, [*base, "--model", str(tiny_checkpoint)])
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()  # no progress bar in front of it: stderr is no terminal
    assert line.startswith(f"Error: {cut.resolve()}: cannot decode audio") and line.endswith(
        "(--skip-bad skips such files)")


def test_cli_evaluate_checks_the_report_path_before_decoding(tmp_path, tiny_checkpoint, monkeypatch):
    import asr.evaluate

    chapter(tmp_path / "c", "13", "1", ["13-1-0001 TEN OF CLUBS"], {"13-1-0001": "0001.flac"})
    decoded = []
    monkeypatch.setattr(asr.evaluate, "decode_utterances", lambda *a, **k: decoded.append(1) or [""])
    report = tmp_path / "no" / "such" / "dir" / "dev.jsonl"
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(tmp_path / "c"), "--model",
                                 str(tiny_checkpoint), "--decoder", "greedy", "--report", str(report)])
    assert r.exit_code == 1 and decoded == []
    assert r.stderr.strip() == f"Error: --report {report}: cannot write there (No such file or directory)"


def test_file_names_that_are_not_utf8_work(tmp_path, tiny_checkpoint, overfit_models):
    """Linux names are bytes: a Latin-1 folder name (caf\\xe9) is as usable as any other."""
    import os

    root = tmp_path / os.fsdecode(b"caf\xe9") / "corpus"
    chapter(root, "13", "1", ["13-1-0001 TEN OF CLUBS"], {"13-1-0001": "0001.flac"})
    audio = root / "13" / "1" / "13-1-0001.flac"
    assert load_audio(audio).shape == load_audio(CARDS / "9301-1-0001.flac").shape
    [u], problems = scan_corpus(root, Vocab())
    assert problems == [] and u.path == str(audio.resolve())
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(root), "--model", str(tiny_checkpoint),
                                 "--decoder", "greedy", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["utterances"] == 1
    # and a user's file there gets its transcript, printed or written beside it
    import shutil

    from conftest import OVERFIT_IDS, SAMPLES, sample_reference

    stem = OVERFIT_IDS[0]
    clip = shutil.copy(SAMPLES / f"{stem}.flac", tmp_path / os.fsdecode(b"caf\xe9") / "clip.flac")
    model = str(overfit_models["bigru"])
    r = CliRunner().invoke(cli, ["transcribe", "--model", model, "--decoder", "greedy", str(clip)])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert r.stdout == sample_reference(stem).lower() + "\n"
    r = CliRunner().invoke(cli, ["transcribe", "--model", model, "--decoder", "greedy", "--output-dir",
                                 str(tmp_path / os.fsdecode(b"caf\xe9")), str(clip)])
    assert r.exit_code == 0 and r.stdout == "", r.output
    assert (tmp_path / os.fsdecode(b"caf\xe9") / "clip.txt").read_text() == \
        sample_reference(stem).lower() + "\n"


def test_cli_evaluate_with_nothing_decodable_is_an_error_not_a_zero_wer(tmp_path, tiny_checkpoint):
    _, cut = damaged_corpus(tmp_path / "c")
    for i in (1, 2, 3):
        f = tmp_path / "c" / "14" / "1" / f"14-1-000{i}.flac"
        f.write_bytes(cut.read_bytes())
    r = CliRunner().invoke(cli, ["evaluate", "--data", str(tmp_path / "c"), "--model", str(tiny_checkpoint),
                                 "--decoder", "greedy", "--skip-bad"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == ("Error: none of the utterances could be decoded "
                                                 "(--skip-bad left them all out)")
