"""How many output frames a streaming model emits after an offline one: the `--distill-delay` to use.

    python benchmarks/emission_delay.py --teacher models/bigru.pt --student models/gru-stream.pt \
        --data ../shared/data/librispeech-train --utterances 40 --max-lag 12

(Both shipped models have 20 ms output frames; a pair of different rates is refused.)

Both models decode the same utterances whole; they must have the same output frame (subsampling).
For each lag d (output frames), the table
gives the share of frames t where the student's best symbol at t + d equals the teacher's at t, and
the correlation of their non-blank probabilities at that lag. A causal student lags a bidirectional
teacher: the lag with the highest agreement is the delay at which distilling compares like with like.
"""

from __future__ import annotations

import argparse

import torch

from asr.audio import load_audio
from asr.checkpoint import load_model
from asr.data import sample_utterances, scan_corpus
from asr.text import Vocab


def posteriors(lm, utts) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for u in utts:
            feats = lm.features(load_audio(u.path))
            lp, _ = lm.model(feats[None], torch.tensor([feats.shape[0]]))
            out.append(lp[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="offline model (e.g. models/bigru.pt)")
    ap.add_argument("--student", required=True, help="streaming model (e.g. models/gru-stream.pt)")
    ap.add_argument("--data", required=True, help="a LibriSpeech-layout corpus")
    ap.add_argument("--utterances", type=int, default=40, help="a fixed random sample of this many")
    ap.add_argument("--max-lag", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        utts, _ = scan_corpus(args.data, Vocab())
        t_model, s_model = load_model(args.teacher), load_model(args.student)
    except (OSError, ValueError) as e:  # a missing file, a foreign checkpoint, a malformed corpus
        raise SystemExit(f"error: {e}") from None
    utts = sample_utterances(utts, args.utterances)
    if t_model.frame_seconds != s_model.frame_seconds:
        raise SystemExit(f"error: the teacher's output frames are {1000 * t_model.frame_seconds:g} ms, the "
                         f"student's {1000 * s_model.frame_seconds:g} ms: their frames do not line up")
    frame_ms = 1000 * t_model.frame_seconds
    teacher, student = posteriors(t_model, utts), posteriors(s_model, utts)
    print(f"{len(utts)} utterances of {args.data}; teacher {args.teacher}, student {args.student}\n")
    print("| student lag (frames) | lag (ms) | same best symbol | non-blank correlation |")
    print("|---:|---:|---:|---:|")
    for d in range(args.max_lag + 1):
        same = frames = 0
        a, b = [], []
        for t_lp, s_lp in zip(teacher, student, strict=True):
            n = min(len(t_lp), len(s_lp)) - d
            if n <= 0:
                continue
            same += int((t_lp[:n].argmax(-1) == s_lp[d:d + n].argmax(-1)).sum())
            frames += n
            a.append(1 - t_lp[:n, 0].exp())
            b.append(1 - s_lp[d:d + n, 0].exp())
        corr = torch.corrcoef(torch.stack([torch.cat(a), torch.cat(b)]))[0, 1]
        print(f"| {d} | {frame_ms * d:g} | {100 * same / frames:.1f} % | {float(corr):.3f} |")


if __name__ == "__main__":
    main()
