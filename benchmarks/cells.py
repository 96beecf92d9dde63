"""GRU vs LSTM vs Elman RNN at about the same parameter count: size, training and inference speed.

For each cell the hidden size is chosen so the whole model has about as many parameters as the
reference GRU; the script then times CTC training steps (forward + backward + AdamW) and offline
inference on random features of real utterance length, and streaming `step()` on 100 ms chunks.

    python benchmarks/cells.py --threads 2
    python benchmarks/cells.py --arch bigru --hidden-size 256 --num-layers 3
    python benchmarks/cells.py --cells gru --hidden-size 176 --num-layers 3 --subsampling 2  # one width

Prints a Markdown table. Accuracy at equal training is measured with `asr train --cell ...` (see
models/README.md); this script only measures cost.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from _args import positive_float, positive_int  # benchmarks/, the script's own folder

from asr.model import CTCModel, ModelConfig, count_parameters


def build(cell: str, hidden: int, args) -> CTCModel:
    return CTCModel(ModelConfig(bidirectional=args.arch == "bigru", cell=cell, hidden_size=hidden,
                                num_layers=args.num_layers, subsampling=args.subsampling))


def matched_hidden(cell: str, target: int, args) -> int:
    """Hidden size whose model has the parameter count closest to `target`."""
    return min(range(64, 1025, 8), key=lambda h: abs(count_parameters(build(cell, h, args)) - target))


def time_train(model: CTCModel, batch: int, frames: int, repeats: int) -> float:
    """Audio seconds trained per wall second."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, frames, 80)
    lengths = torch.full((batch,), frames)
    targets = torch.randint(1, 29, (batch, frames // 8))
    tlen = torch.full((batch,), frames // 8)
    total = 0.0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        lp, olen = model(x, lengths)
        loss = F.ctc_loss(lp.transpose(0, 1), targets, olen, tlen, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            total += time.perf_counter() - t0
    return repeats * batch * frames / 100 / total


def time_infer(model: CTCModel, frames: int, repeats: int) -> float:
    """Real-time factor of offline inference on one utterance."""
    model.eval()
    x = torch.randn(1, frames, 80)
    with torch.inference_mode():
        model(x, torch.tensor([frames]))
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, torch.tensor([frames]))
    return (time.perf_counter() - t0) / repeats / (frames / 100)


def time_stream(model: CTCModel, frames: int) -> float:
    """Real-time factor of step() on 100 ms (10-frame) chunks (unidirectional models only)."""
    model.eval()
    x = torch.randn(1, frames, 80)
    state = model.init_state()
    with torch.inference_mode():
        t0 = time.perf_counter()
        for s in range(0, frames, 10):
            _, state = model.step(x[:, s:s + 10], state)
    return (time.perf_counter() - t0) / (frames / 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["bigru", "gru"], default="gru")
    ap.add_argument("--hidden-size", type=positive_int, default=384, help="reference GRU hidden size")
    ap.add_argument("--num-layers", type=positive_int, default=4)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seconds", type=positive_float, default=10.0, help="utterance length")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--subsampling", type=int, choices=[2, 4], default=4,
                    help="input frames per output frame (the shipped models: 2)")
    ap.add_argument("--cells", default="gru,lstm,rnn",
                    help="comma-separated subset of gru,lstm,rnn (e.g. gru alone to compare widths)")
    args = ap.parse_args()
    cells = args.cells.split(",")
    if any(c not in ("gru", "lstm", "rnn") for c in cells):
        ap.error(f"--cells: a comma-separated subset of gru,lstm,rnn, not {args.cells!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    frames = int(args.seconds * 100)
    target = count_parameters(build("gru", args.hidden_size, args))
    print(f"{args.arch} x{args.num_layers}, {args.subsampling * 10} ms frames, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; utterances of {args.seconds:.0f} s, batch {args.batch}\n")
    print("| cell | hidden | parameters | train audio s/s | offline RTF | streaming RTF (100 ms) |")
    print("|---|---|---|---|---|---|")
    for cell in cells:
        hidden = args.hidden_size if cell == "gru" else matched_hidden(cell, target, args)
        model = build(cell, hidden, args)
        train_speed = time_train(model, args.batch, frames, args.repeats)
        rtf = time_infer(model, frames, args.repeats)
        stream = f"{time_stream(model, frames):.4f}" if args.arch == "gru" else "n/a"
        print(f"| {cell} | {hidden} | {count_parameters(model) / 1e6:.2f} M | {train_speed:.0f} | "
              f"{rtf:.4f} | {stream} |", flush=True)


if __name__ == "__main__":
    main()
