"""How much a stretch without speech before each utterance costs a model (the running mean's weak spot).

    python benchmarks/lead_in.py --model models/bigru.pt --data ../shared/data/librispeech-dev \
        --lead noise:3 --lead noise:15 [--stream] [--floor-gate 0.5]

Every utterance of --data is decoded greedily as it is, then once per --lead KIND:SECONDS with that
much white noise at -55 dBFS (`noise`) or exact zeros (`silence`) put in front of it (noise drawn
from one generator, seed 0, utterance after utterance, lead after lead). --stream decodes through the
streaming session (causal models); --floor-gate overrides the model's running-mean gate at load time
(a front end the model was not trained with). Prints corpus WER / CER per condition, scored like `asr evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _args import positive_int  # noqa: E402  (benchmarks/, the script's own folder)

from asr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr.checkpoint import CheckpointError, load_model  # noqa: E402
from asr.data import CorpusError, load_corpora  # noqa: E402
from asr.evaluate import error_counts  # noqa: E402
from asr.live import run_file_stream  # noqa: E402
from asr.transcribe import decode_wave  # noqa: E402


def _lead(text: str) -> tuple[str, float]:
    kind, _, seconds = text.partition(":")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if kind not in ("noise", "silence") or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected noise:SECONDS or silence:SECONDS (SECONDS >= 0), "
                                         f"got {text!r}")
    return kind, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="LibriSpeech-layout corpus folder")
    ap.add_argument("--lead", type=_lead, action="append", default=[], help="noise:SECONDS or silence:SECONDS")
    ap.add_argument("--stream", action="store_true", help="decode through the streaming session")
    ap.add_argument("--floor-gate", type=float, help="override the running mean's noise-floor gate")
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        lm = load_model(args.model)
        if args.floor_gate is not None:
            lm = dataclasses.replace(lm, feature_config=dataclasses.replace(
                lm.feature_config, cmn_floor_gate=args.floor_gate))
        utts, _ = load_corpora([args.data], lm.vocab, skip_bad=True)
        waves = [load_audio(u.path) for u in utts]  # read once, used by every condition
    except (CheckpointError, CorpusError, ValueError) as e:  # AudioError is a ValueError
        raise SystemExit(f"error: {e}") from None
    refs = [u.text for u in utts]
    rng = np.random.default_rng(0)
    print(f"| {Path(args.model).name}, {'streamed' if args.stream else 'file'} | WER % | CER % |")
    print("|---|--:|--:|")
    for kind, seconds in [("none", 0.0), *args.lead]:
        hyps = []
        for wave in waves:
            n = int(seconds * SAMPLE_RATE)
            if kind == "noise":
                wave = np.concatenate([(rng.standard_normal(n) * 10 ** (-55 / 20)).astype(np.float32), wave])
            elif kind == "silence":
                wave = np.concatenate([np.zeros(n, np.float32), wave])
            text = run_file_stream(lm, wave, echo=False).text if args.stream else decode_wave(lm, wave)[1]
            hyps.append(text)
        name = "no lead-in" if kind == "none" else f"{seconds:g} s {kind}"
        e = error_counts(refs, hyps)  # the same normalisation and scoring as `asr evaluate`
        print(f"| {name} | {100 * e.wer:.1f} | {100 * e.cer:.1f} |", flush=True)


if __name__ == "__main__":
    main()
