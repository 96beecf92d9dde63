"""Shared fixtures: committed real audio, and tiny models trained on it (session-scoped, CPU).

`overfit_models` trains a small offline BiGRU and a small streaming GRU on four short real
utterances with the project's own `train()` until they reproduce the transcripts; tests that need
a model which really outputs text use them. Training both takes well under a minute on 2 cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORPUS = FIXTURES / "corpus"  # sphinx/ (11 real FLAC clips) and synth/ (4 synthetic Opus clips)

# short real utterances the overfit models learn (ids in tests/fixtures/corpus/sphinx)
OVERFIT_IDS = ("9300-1-0088", "9300-1-0093", "9301-1-0005", "9302-1-0000")


def sample_reference(stem: str) -> str:
    return (SAMPLES / f"{stem}.txt").read_text().strip()


def make_subcorpus(src: Path, dst: Path, ids: tuple[str, ...]) -> Path:
    """Copy the given utterances (audio + their transcript lines) into a new LibriSpeech tree."""
    for trans in src.rglob("*.trans.txt"):
        lines = [ln for ln in trans.read_text().splitlines() if ln.split(" ", 1)[0] in ids]
        if not lines:
            continue
        out_dir = dst / trans.parent.relative_to(src)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / trans.name).write_text("\n".join(lines) + "\n")
        for ln in lines:
            uid = ln.split(" ", 1)[0]
            for audio in trans.parent.glob(f"{uid}.*"):
                shutil.copy(audio, out_dir / audio.name)
    return dst


@pytest.fixture(scope="session")
def overfit_corpus(tmp_path_factory) -> Path:
    return make_subcorpus(CORPUS / "sphinx", tmp_path_factory.mktemp("overfit") / "corpus", OVERFIT_IDS)


@pytest.fixture(scope="session")
def overfit_models(overfit_corpus, tmp_path_factory) -> dict[str, Path]:
    """{"bigru": path, "gru": path}: checkpoints that transcribe OVERFIT_IDS (nearly) perfectly."""
    import os

    from asr.train import TrainConfig, train

    torch.set_num_threads(2)
    # developers may keep the trained pair between runs (never set in CI)
    cache = os.environ.get("ASR_TEST_MODEL_CACHE")
    out = {}
    for arch, steps in (("bigru", 160), ("gru", 200)):
        if cache and (Path(cache) / f"{arch}.pt").exists():
            out[arch] = Path(cache) / f"{arch}.pt"
            continue
        run = tmp_path_factory.mktemp(f"run-{arch}")
        # no dev set: with 4 utterances every step ends an epoch, and per-epoch dev WER would
        # dominate the run; the tests check the transcripts themselves
        cfg = TrainConfig(train=(str(overfit_corpus),), dev=(), out=str(run),
                          arch=arch, hidden_size=128, num_layers=2, conv_channels=16, dropout=0.0,
                          max_steps=steps, batch_seconds=40, lr=3e-3, warmup_steps=20, augment=False,
                          num_workers=0, log_every=50, eval_every=40, save_every=10_000,
                          stats_utterances=50)
        out[arch] = train(cfg)
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            shutil.copy(out[arch], Path(cache) / f"{arch}.pt")
    return out


def write_paused_corpus(src: Path, dst: Path) -> Path:
    """The OVERFIT_IDS utterances as they are, and again after 2.5-3.5 s of digital silence and
    before a pause (silence or quiet noise), as one LibriSpeech tree (speaker 9800).

    After a few seconds of silence a GRU's state settles to one fixed point, so a model trained
    on these starts an utterance the same way whatever silence precedes it (at least 2.5 s), as a
    live capture does."""
    import numpy as np
    import soundfile as sf

    from asr.audio import load_audio

    rate = 16000
    rng = np.random.default_rng(0)
    refs = {}
    for trans in src.rglob("*.trans.txt"):
        for ln in trans.read_text().splitlines():
            uid, text = ln.split(" ", 1)
            refs[uid] = (load_audio(trans.parent / f"{uid}.flac"), text)

    def pause(seconds: float, level: float = 0.0) -> np.ndarray:
        return (level * rng.standard_normal(int(seconds * rate))).astype(np.float32)

    items = [(pause(0), *refs[uid], pause(0)) for uid in OVERFIT_IDS]
    items += [(pause(rng.uniform(2.5, 3.5)), *refs[uid],
               pause(rng.uniform(0.8, 2.0), level=rng.choice([0.0, 3e-4])))
              for uid in OVERFIT_IDS]
    out = dst / "9800" / "1"
    out.mkdir(parents=True)
    lines = []
    for i, (before, wave, text, after) in enumerate(items):
        sf.write(out / f"9800-1-{i:04d}.flac", np.concatenate([before, wave, after]), rate)
        lines.append(f"9800-1-{i:04d} {text}")
    (out / "9800-1.trans.txt").write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="session")
def paused_stream_model(overfit_corpus, tmp_path_factory) -> Path:
    """A small streaming GRU trained like overfit_models["gru"], but also on the utterances with
    pauses around them: it outputs blanks in silence, as a real model does (the overfit one spells
    letters there), so endpointing and live capture, which starts and ends in silence, can be
    tested with real text."""
    import os

    from asr.train import TrainConfig, train

    cache = os.environ.get("ASR_TEST_MODEL_CACHE")
    if cache and (Path(cache) / "gru-paused.pt").exists():
        return Path(cache) / "gru-paused.pt"
    torch.set_num_threads(2)
    corpus = write_paused_corpus(overfit_corpus, tmp_path_factory.mktemp("paused") / "corpus")
    cfg = TrainConfig(train=(str(corpus),), dev=(), out=str(tmp_path_factory.mktemp("run-paused")),
                      arch="gru", hidden_size=128, num_layers=2, conv_channels=16, dropout=0.0,
                      max_steps=400, batch_seconds=80, lr=3e-3, warmup_steps=20, augment=False,
                      num_workers=0, log_every=50, save_every=10_000, stats_utterances=50)
    path = train(cfg)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(cache) / "gru-paused.pt")
    return path


@pytest.fixture
def random_stream_model():
    """A randomly initialised small causal model (for exactness tests that need no accuracy)."""
    from asr.checkpoint import LoadedModel
    from asr.features import FeatureConfig, FeatureStats
    from asr.model import CTCModel, ModelConfig
    from asr.text import Vocab

    torch.manual_seed(0)
    vocab = Vocab()
    model = CTCModel(ModelConfig(vocab_size=len(vocab), bidirectional=False, hidden_size=64,
                                 num_layers=2, conv_channels=8)).eval()
    stats = FeatureStats(mean=torch.full((80,), -8.0), std=torch.full((80,), 3.0))
    return LoadedModel(model, FeatureConfig(), stats, vocab)
