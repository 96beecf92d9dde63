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
