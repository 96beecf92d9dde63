"""One checkpoint file: configs, weights, normalisation stats, vocabulary, training metadata.

Files are read with `torch.load(weights_only=True)`, so a checkpoint can never run code, and written
atomically (temporary file in the same folder, fsync, rename) so a crash never leaves a half-written one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .features import FeatureConfig, FeatureStats, log_mel, normalize_features
from .model import CTCModel, ModelConfig
from .paths import readable_file
from .text import Vocab

FORMAT = "asr-gru-ctc"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_OFFLINE_MODEL = MODELS_DIR / "bigru.pt"
DEFAULT_STREAMING_MODEL = MODELS_DIR / "gru-stream.pt"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this project; the message says why."""


@dataclass
class LoadedModel:
    """A model ready for inference with everything needed to feed and read it."""

    model: CTCModel
    feature_config: FeatureConfig
    stats: FeatureStats
    vocab: Vocab
    meta: dict = field(default_factory=dict)
    path: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else "model"

    @property
    def frame_seconds(self) -> float:
        """Seconds per model output frame."""
        cfg = self.feature_config
        return cfg.hop_length * self.model.cfg.subsampling / cfg.sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, wave) -> torch.Tensor:
        """(N,) samples at the model's rate -> (T, F) the model's input frames for a whole utterance."""
        return normalize_features(log_mel(wave, self.feature_config), self.feature_config, self.stats)


def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file next to `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def make_checkpoint(model: CTCModel, feature_config: FeatureConfig, stats: FeatureStats,
                    vocab: Vocab, meta: dict | None = None, half: bool = False, **extra) -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.cfg.to_dict(),
        "feature_config": feature_config.to_dict(),
        "feature_stats": stats.to_dict(),
        "vocab": vocab.to_dict(),
        "state_dict": state,
        "meta": meta or {},
        **extra,
    }


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint dict without executing any code from it."""
    p = readable_file(path, "model file", CheckpointError)
    with open(p, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch's zip container, or a legacy pickle
        raise CheckpointError(f"{p}: not a model file (expected a PyTorch checkpoint)")
    try:
        with warnings.catch_warnings():  # e.g. a foreign pickle's protocol warning: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "unsupported global" in str(e).lower():  # a class or function: code could run
            raise CheckpointError(
                f"{p}: refused: the file contains Python objects that could run code "
                f"(only plain tensors and containers are accepted)") from None
        if "Weights only load failed" in str(e):  # torch's long preamble says nothing about the file
            raise CheckpointError(f"{p}: refused: a raw Python pickle, not a PyTorch checkpoint "
                                  f"(unpickling could run code)") from None
        raise CheckpointError(f"{p}: not a valid checkpoint ({first})") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or foreign file: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an {FORMAT} checkpoint of this project")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{p}: checkpoint has no valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {version} is newer than this program supports "
            f"({FORMAT_VERSION}); upgrade asr-gru")
    for key in ("model_config", "feature_config", "feature_stats", "vocab", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{p}: checkpoint lacks '{key}'")
    return ckpt


def checkpoint_feature_config(ckpt: dict, path: str = "") -> FeatureConfig:
    """The feature settings of a checkpoint read with read_checkpoint; CheckpointError if unusable."""
    try:
        return FeatureConfig(**ckpt["feature_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint has unusable feature settings ({e})") from None


def model_from_checkpoint(ckpt: dict, path: str = "") -> LoadedModel:
    try:
        mcfg = ModelConfig(**ckpt["model_config"])
        fcfg = FeatureConfig(**ckpt["feature_config"])
        vocab = Vocab.from_dict(ckpt["vocab"])
        stats = FeatureStats.from_dict(ckpt["feature_stats"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        with torch.device("meta"):  # shapes only: a hostile config cannot make us allocate
            expected = {k: tuple(v.shape) for k, v in CTCModel(mcfg).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[0][0]
            raise ValueError(f"weights do not fit the configured model, e.g. '{diff}'")
        model = CTCModel(mcfg)
        model.load_state_dict(state)
        consistent = (len(vocab) == mcfg.vocab_size and fcfg.n_mels == mcfg.n_mels
                      and tuple(stats.mean.shape) == tuple(stats.std.shape) == (fcfg.n_mels,))
        meta = dict(ckpt.get("meta") or {})
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: checkpoint does not match the model architecture ({first})") from None
    if not consistent:
        raise CheckpointError(f"{path}: inconsistent vocabulary or feature sizes in checkpoint")
    model.eval()
    return LoadedModel(model, fcfg, stats, vocab, meta, str(path))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               precision: str = "float32") -> LoadedModel:
    """Read a checkpoint file and return the model in eval mode on `device`.

    precision: of the recurrent layers (see CTCModel.set_precision): "float32", or "bfloat16" for
    faster CPU inference at nearly the same accuracy.
    """
    lm = model_from_checkpoint(read_checkpoint(path), str(path))
    lm.model.to(device).set_precision(precision)
    return lm


def default_model_path(streaming: bool) -> Path:
    return DEFAULT_STREAMING_MODEL if streaming else DEFAULT_OFFLINE_MODEL
