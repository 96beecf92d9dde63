"""Training throughput: audio seconds trained per wall-clock second, and peak memory.

For each default model size (the shipped models' recipes) and each CPU thread count (and the GPU
when there is one), a fresh child process loads real batches from a LibriSpeech-layout corpus,
with the training augmentation (batches spread from the shortest utterances to the longest), then
times full optimizer steps (`asr.train.train_step`: forward, CTC loss, backward, clipping, AdamW). Batches are prepared before the clock starts: in training
DataLoader workers prepare them in parallel with the step, so the step is what bounds the speed;
the data column gives the preparation rate of one worker for comparison.

    python benchmarks/train_throughput.py ../shared/data/librispeech-dev
    python benchmarks/train_throughput.py CORPUS --threads 1,2,4 --steps 5 --batch-seconds 240
    python benchmarks/train_throughput.py CORPUS --threads 1 --recurrence padded,packed
    python benchmarks/train_throughput.py CORPUS --threads 2 --subsampling 4,2

`--recurrence packed` runs the recurrent layers on a packed batch on the CPU too (the CUDA path),
to compare it with the CPU's default padded recurrence. `--subsampling 2` times the 20 ms output
frame models (`asr train --subsampling 2`).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# name -> (arch, hidden size, layers): the recipes of models/bigru.pt and models/gru-stream.pt
MODELS = {
    "bigru 3x256": ("bigru", 256, 3),
    "gru 4x384": ("gru", 384, 4),
}


def measure(spec: dict) -> dict:
    """Runs in a child process: one model on one device with one thread count."""
    import torch

    from asr.data import AugmentConfig, DurationBatchSampler, SpeechDataset, collate, load_corpora
    from asr.features import FeatureConfig, FeatureStats
    from asr.model import CTCModel, ModelConfig, count_parameters
    from asr.text import Vocab
    from asr.train import train_step

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    vocab, fcfg = Vocab(), FeatureConfig()
    utts, _ = load_corpora([spec["corpus"]], vocab, skip_bad=True)
    stats = FeatureStats(mean=torch.full((fcfg.n_mels,), -8.0), std=torch.full((fcfg.n_mels,), 3.0))
    ds = SpeechDataset(utts, vocab, fcfg, stats, AugmentConfig())
    sampler = DurationBatchSampler([u.duration for u in utts], spec["batch_seconds"], seed=0)
    plan = sampler.epoch_batches(0)
    # batches spread evenly from the shortest utterances to the longest (the step cost grows with
    # the utterance length, not only with the audio per batch)
    plan = sorted(plan, key=lambda b: max(utts[i].duration for i, _ in b))
    n = spec["steps"] + 1
    plan = [plan[round(k * (len(plan) - 1) / max(1, n - 1))] for k in range(n)]
    t0 = time.perf_counter()
    batches = [collate([ds[item] for item in b]) for b in plan]
    data_s = time.perf_counter() - t0
    audio = [float(b["lengths"].sum()) / 100.0 for b in batches]  # seconds (10 ms frames)

    arch, hidden, layers = MODELS[spec["model"]]
    model = CTCModel(ModelConfig(n_mels=fcfg.n_mels, vocab_size=len(vocab), bidirectional=arch == "bigru",
                                 hidden_size=hidden, num_layers=layers,
                                 subsampling=spec["subsampling"])).to(device).train()
    if spec["recurrence"] == "packed":
        model._recur = model._recur_packed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    train_step(model, opt, scaler, batches[0], device, 5.0)  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[1:]:
        train_step(model, opt, scaler, b, device, 5.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    n = len(batches) - 1
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"params_m": count_parameters(model) / 1e6, "steps": n,
            "batch_audio_s": sum(audio[1:]) / n, "ms_per_step": 1000 * step_s / n,
            "audio_per_s": sum(audio[1:]) / step_s, "data_audio_per_s": sum(audio) / data_s,
            "peak_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="LibriSpeech-layout folder with real speech")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts, comma separated")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--batch-seconds", type=float, default=240.0,
                    help="padded audio per batch (the training default)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma separated: " + ", ".join(MODELS))
    ap.add_argument("--recurrence", default="padded", help="comma separated: padded (the CPU's), packed")
    ap.add_argument("--subsampling", default="4", help="comma separated: 4 (40 ms output frames), 2 (20 ms)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU even when there is one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    import torch

    runs = [("cpu", int(t)) for t in args.threads.split(",")]
    if torch.cuda.is_available() and not args.no_gpu:
        runs.append(("cuda", 1))
    cpu = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.no_gpu else "none"
    print(f"corpus {args.corpus}; batches of {args.batch_seconds:g} s padded audio with augmentation; "
          f"{args.steps} timed steps after 1 warm-up; {cpu} CPU cores; GPU: {gpu}; torch {torch.__version__}\n")
    print("| model, recurrence | params | device | threads | audio/batch | ms/step | audio s per s | "
          "peak memory | data prep (1 worker) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    configs = [(n, r, int(s)) for n in args.models.split(",") for r in args.recurrence.split(",")
               for s in args.subsampling.split(",")]
    for name, recurrence, sub in configs:
        label = f"{name}, {recurrence}" + (f", {10 * sub} ms" if args.subsampling != "4" else "")
        for device, threads in runs:
            spec = {"model": name, "device": device, "threads": threads, "corpus": args.corpus,
                    "recurrence": recurrence, "subsampling": sub,
                    "steps": args.steps, "batch_seconds": args.batch_seconds}
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run([sys.executable, __file__, args.corpus, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"| {label} | | {device} | {threads} | failed: "
                      f"{(proc.stderr.strip().splitlines() or ['?'])[-1]} | | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mem = "GPU " if device == "cuda" else "RSS "
            print(f"| {label} | {r['params_m']:.2f} M | {device} | {threads if device == 'cpu' else '-'} "
                  f"| {r['batch_audio_s']:.0f} s | {r['ms_per_step']:.0f} | {r['audio_per_s']:.1f} "
                  f"| {mem}{r['peak_mb']:.0f} MB | {r['data_audio_per_s']:.0f} s/s |", flush=True)


if __name__ == "__main__":
    main()
