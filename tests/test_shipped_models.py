"""The models shipped in models/ on the real recordings in samples/ (speakers they were never
trained on): what a new user's first command prints must stay recognisable. The bounds are the
character error rates measured when the models were shipped (models/README.md) plus a margin for
library-version noise; a worse model, a broken export or a front-end change fails here."""

from __future__ import annotations

import jiwer
import pytest
from click.testing import CliRunner
from conftest import ROOT, SAMPLES, sample_reference

from cli import cli

pytestmark = pytest.mark.skipif(not (ROOT / "models" / "bigru.pt").exists(),
                                reason="shipped models not in this checkout")

STEMS = sorted(p.stem for p in SAMPLES.glob("*.flac"))

# (command-line flags, highest corpus CER accepted on samples/)
CASES = {
    "bigru, beam + LM (asr transcribe)": ([], 0.15),
    "bigru, greedy": (["--decoder", "greedy"], 0.20),
    "gru-stream, beam + LM (asr transcribe --stream)": (["--stream"], 0.14),
    "bigru, greedy, bfloat16": (["--decoder", "greedy", "--precision", "bfloat16"], 0.20),
    "gru-stream, greedy, bfloat16": (["--stream", "--decoder", "greedy", "--precision", "bfloat16"],
                                     0.23),
}


def test_there_are_samples_with_references():
    assert 3 <= len(STEMS) <= 5
    assert all(sample_reference(s) for s in STEMS)


@pytest.mark.parametrize("case", list(CASES))
def test_shipped_model_transcribes_the_samples_recognisably(case):
    flags, max_cer = CASES[case]
    hyps = []
    for stem in STEMS:  # one file at a time: --stream may print an utterance as several lines
        r = CliRunner().invoke(cli, ["transcribe", *flags, str(SAMPLES / f"{stem}.flac")])
        assert r.exit_code == 0, r.output
        hyps.append(" ".join(r.stdout.split()))
    refs = [sample_reference(s).lower() for s in STEMS]
    cer = jiwer.cer(refs, hyps)
    print(f"{case}: CER {100 * cer:.1f} %")
    assert cer <= max_cer, list(zip(refs, hyps, strict=True))


def test_bfloat16_streaming_stays_close_to_offline_and_to_float32():
    """bfloat16 rounding makes chunked and whole-input decoding differ slightly (float32: identical,
    tests/test_streaming.py); the best token per frame must still agree almost everywhere."""
    import torch

    from asr.audio import load_audio
    from asr.checkpoint import DEFAULT_STREAMING_MODEL, load_model

    ref, half = (load_model(DEFAULT_STREAMING_MODEL, precision=p) for p in ("float32", "bfloat16"))
    same_stream = same_float = frames = 0
    for stem in STEMS:
        feats = half.features(load_audio(SAMPLES / f"{stem}.flac"))
        with torch.inference_mode():
            whole = half.model(feats[None], torch.tensor([feats.shape[0]]))[0][0]
            exact = ref.model(feats[None], torch.tensor([feats.shape[0]]))[0][0]
            state, parts = half.model.init_state(), []
            for a in range(0, feats.shape[0], 10):  # 100 ms chunks
                lp, state = half.model.step(feats[None, a:a + 10], state)
                parts.append(lp[0])
        best = torch.cat(parts).argmax(-1)
        same_stream += (best == whole.argmax(-1)).sum().item()
        same_float += (best == exact.argmax(-1)).sum().item()
        frames += len(best)
    print(f"bfloat16 stream: best token as offline bfloat16 {same_stream}/{frames}, "
          f"as float32 {same_float}/{frames}")
    assert same_stream >= 0.99 * frames and same_float >= 0.98 * frames
