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
    "bigru, beam + LM (asr transcribe)": ([], 0.13),
    "bigru, greedy": (["--decoder", "greedy"], 0.20),
    "gru-stream, beam + LM (asr transcribe --stream)": (["--stream"], 0.19),
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
