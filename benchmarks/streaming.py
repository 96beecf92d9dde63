"""Live streaming cost on one CPU thread: per-chunk compute, real-time factor, final-text latency,
and resident memory over a long continuous stream.

    python benchmarks/streaming.py [--model models/gru-stream.pt] [--chunk-ms 40 100 200]
        [--decoder greedy beam] [--timing-seconds 120] [--latency-utterances 40]
        [--memory-minutes 1 10 60] [--threads 1 [2 ...]] [--busy N] [--precision float32 bfloat16]
        [--state-data ../shared/data/librispeech-dev [--state-utterances 40]]

The audio is the speech in samples/ with 1.5 s of quiet noise after each utterance, looped, and fed
as fast as possible through `StreamingSession.push` (featurizer, model step, decoder, endpointing):

- chunk p50/p95: compute time of one push() of a chunk of that size;
- RTF: total push() time / audio time (lower is faster; the target is at most 0.05);
- final p50/p95: from the arrival of the last audio sample of an utterance to its final text, i.e.
  the push() of the chunk holding that sample plus flush(); the endpoint wait (--endpoint-ms of
  silence in a live session) is not included. Target: at most 50 ms at p95;
- RSS: resident memory of this process after 1, 10 and 60 minutes of continuous audio (100 ms
  chunks); it must stay flat, since a session's state does not grow with the stream;
- --threads: torch intra-op threads for the timings (the CLI streams on 1 by default); --busy N
  keeps N other processes spinning on the CPU meanwhile, as a loaded machine would (a training
  run, a browser), where extra threads cost far more than they give;
- --precision: the recurrent layers in float32 and/or bfloat16 (`--precision` of the CLI); the
  memory is measured with the last one;
- with --state-data: WER of dev utterances joined by pauses into streams, with the model's hidden
  state kept or reset at each endpoint (and each utterance decoded alone, for reference).

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATE = 16000
GAP_S = 1.5  # silence after each utterance in the looped program


def _spin() -> None:
    while True:
        pass


class Busy:
    """N processes spinning on the CPU while the block runs."""

    def __init__(self, n: int):
        self.n = n
        self.procs = []

    def __enter__(self):
        import multiprocessing as mp

        self.procs = [mp.get_context("spawn").Process(target=_spin, daemon=True)
                      for _ in range(self.n)]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.join()


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_program() -> tuple[list[np.ndarray], np.ndarray]:
    """The sample utterances, and one pass of them each followed by quiet noise."""
    from asr.audio import load_audio

    utts = [load_audio(p) for p in sorted((ROOT / "samples").glob("*.flac"))]
    if not utts:
        raise SystemExit("no audio in samples/")
    rng = np.random.default_rng(0)
    parts = []
    for u in utts:
        parts += [u, (1e-4 * rng.standard_normal(int(GAP_S * RATE))).astype(np.float32)]
    return utts, np.concatenate(parts)


def looped_chunks(program: np.ndarray, chunk: int, total_samples: int):
    """Consecutive chunks of the looped program, `total_samples` in all."""
    pos = 0
    while pos < total_samples:
        start = pos % len(program)
        piece = program[start:start + chunk]
        if len(piece) < chunk:  # wrap around
            piece = np.concatenate([piece, program[: chunk - len(piece)]])
        piece = piece[: total_samples - pos]
        pos += len(piece)
        yield piece


def percentile_ms(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q))


def timing(lm, program, chunk_ms: int, seconds: float, beam=None) -> tuple[float, float, float]:
    """(p50 ms, p95 ms, RTF) of push() over `seconds` of continuous audio."""
    from asr.streaming import StreamingSession

    chunk = RATE * chunk_ms // 1000
    session = StreamingSession(lm, beam=beam)
    for piece in looped_chunks(program, chunk, RATE):  # warm-up: 1 s
        session.push(piece)
    session.reset()
    times = []
    for piece in looped_chunks(program, chunk, int(seconds * RATE)):
        t0 = time.perf_counter()
        session.push(piece)
        times.append(time.perf_counter() - t0)
    return percentile_ms(times, 50), percentile_ms(times, 95), sum(times) / seconds


def final_latency(lm, utts, chunk_ms: int, n: int, beam=None) -> tuple[float, float]:
    """(p50 ms, p95 ms) of last-chunk push() + flush() over n utterances."""
    from asr.streaming import StreamingSession

    chunk = RATE * chunk_ms // 1000
    session = StreamingSession(lm, beam=beam)
    lat = []
    for i in range(n):
        u = utts[i % len(utts)]
        session.reset()
        pieces = [u[s:s + chunk] for s in range(0, len(u), chunk)]
        for piece in pieces[:-1]:
            session.push(piece)
        t0 = time.perf_counter()
        session.push(pieces[-1])
        finals = session.flush()
        lat.append(time.perf_counter() - t0)
        assert finals, "no final text: is this a trained model?"
    return percentile_ms(lat, 50), percentile_ms(lat, 95)


def memory(lm, program, minutes: list[float], chunk_ms: int = 100,
           beam=None) -> list[tuple[str, float]]:
    """RSS (MB) after 10 s and after each number of minutes of continuous audio."""
    from asr.streaming import StreamingSession

    session = StreamingSession(lm, beam=beam)
    marks = [(10 / 60, "10 s")] + [(m, f"{m:g} min") for m in sorted(minutes)]
    rows, pos = [], 0
    for piece in looped_chunks(program, RATE * chunk_ms // 1000, int(marks[-1][0] * 60 * RATE)):
        session.push(piece)
        pos += len(piece)
        while marks and pos >= marks[0][0] * 60 * RATE:
            rows.append((marks.pop(0)[1], rss_mb()))
    return rows


def endpoint_state(lm, data: list[str], n_utts: int, group: int) -> list[tuple[str, object, int]]:
    """WER of keeping the state at endpoints vs resetting the hidden state vs restarting the
    running mean, on dev utterances joined by quiet noise `group` at a time (in id order: one speaker
    per stream where a corpus has several utterances per speaker, as synth dev; four in
    librispeech-dev); and of each utterance decoded alone, for reference."""
    from asr.audio import load_audio
    from asr.data import load_corpora
    from asr.evaluate import error_counts
    from asr.streaming import StreamingSession

    utts, _ = load_corpora(data, lm.vocab, skip_bad=True)
    utts = sorted(utts, key=lambda u: u.id)[:n_utts]
    rng = np.random.default_rng(0)
    waves = [load_audio(u.path) for u in utts]
    groups = [list(range(i, min(i + group, len(utts)))) for i in range(0, len(utts), group)]
    refs = [" ".join(utts[i].text for i in g) for g in groups]
    streams = []
    for g in groups:  # each utterance followed by a pause of quiet noise
        streams.append(np.concatenate([x for i in g for x in (
            waves[i], (1e-3 * rng.standard_normal(int(GAP_S * RATE))).astype(np.float32))]))
    rows = []
    for label, kw in (("kept (default)", {}), ("reset at each endpoint", {"reset_on_endpoint": True}),
                      ("kept, running mean restarted at each endpoint (--speaker-changes)",
                       {"restart_mean_on_endpoint": True})):
        hyps, n_final = [], 0
        for joined in streams:
            session = StreamingSession(lm, **kw)
            finals = [e for s in range(0, len(joined), RATE // 10)
                      for e in session.push(joined[s:s + RATE // 10]) if e.kind == "final"]
            finals += session.flush()
            n_final += len(finals)
            hyps.append(" ".join(e.text for e in finals))
        rows.append((label, error_counts(refs, hyps), n_final))
    alone = []
    for w in waves:
        session = StreamingSession(lm, endpoint_ms=None)
        for s in range(0, len(w), RATE // 10):
            session.push(w[s:s + RATE // 10])
        alone.append(" ".join(e.text for e in session.flush()))
    rows.append(("each utterance alone (fresh state)",
                 error_counts([u.text for u in utts], alone), len(utts)))
    return rows


def main() -> None:
    from asr.checkpoint import DEFAULT_STREAMING_MODEL
    from asr.model import PRECISIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_STREAMING_MODEL),
                    help="unidirectional checkpoint (default: models/gru-stream.pt)")
    ap.add_argument("--chunk-ms", type=int, nargs="+", default=[40, 100, 200])
    ap.add_argument("--timing-seconds", type=float, default=120.0,
                    help="continuous audio per chunk size for the compute times")
    ap.add_argument("--latency-utterances", type=int, default=40)
    ap.add_argument("--memory-minutes", type=float, nargs="*", default=[1, 10, 60],
                    help="RSS after these many minutes of audio (none: skip)")
    ap.add_argument("--decoder", nargs="+", choices=["greedy", "beam"], default=["greedy", "beam"],
                    help="decoders to time (beam: word LM beam search, the CLI default); memory "
                         "is measured with the last")
    ap.add_argument("--state-data", nargs="*", default=[],
                    help="dev corpus folder(s): also compare keeping the state at endpoints "
                         "with resetting the hidden state or restarting the running mean (WER)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch threads for the timings (default: 1, as the CLI streams)")
    ap.add_argument("--busy", type=int, default=0,
                    help="other processes kept spinning on the CPU during the timings")
    ap.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["float32"],
                    help="recurrent layers' precision(s) to time")
    ap.add_argument("--state-utterances", type=int, default=40)
    ap.add_argument("--state-group", type=int, default=4, help="utterances joined per stream")
    args = ap.parse_args()

    import torch

    from asr.checkpoint import CheckpointError, load_model

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model}: no such model; pass a streaming checkpoint with --model")
    try:
        models = {p: load_model(args.model, precision=p) for p in args.precision}
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    lm = next(iter(models.values()))
    if lm.model.cfg.bidirectional:
        raise SystemExit(f"{args.model}: a bidirectional model cannot stream")
    utts, program = load_program()
    cfg = lm.model.cfg
    print(f"model {args.model} ({cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f} M parameters); "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; timings with {args.busy} other busy processes\n")

    decoders = {}
    for name in args.decoder:
        if name == "greedy":
            decoders[name] = None
        else:
            from asr.beam import BeamConfig

            decoders[name] = BeamConfig()
    print("| precision | decoder | threads | chunk | push p50 | push p95 | RTF | final text p50 "
          "| final text p95 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with Busy(args.busy):
        for name, beam in decoders.items():
            for threads in args.threads:
                torch.set_num_threads(threads)
                for ms in args.chunk_ms:
                    for precision, lm in models.items():
                        p50, p95, rtf = timing(lm, program, ms, args.timing_seconds, beam)
                        l50, l95 = final_latency(lm, utts, ms, args.latency_utterances, beam)
                        print(f"| {precision} | {name} | {threads} | {ms} ms | {p50:.2f} ms "
                              f"| {p95:.2f} ms | {rtf:.4f} | {l50:.1f} ms | {l95:.1f} ms |", flush=True)
    torch.set_num_threads(1)

    if args.state_data:
        print(f"\n| state at endpoints ({args.state_group} utterances per stream, "
              f"{GAP_S} s pauses) | precision | WER | CER | final events |")
        print("|---|---|---:|---:|---:|")
        for precision, lm in models.items():
            rows = endpoint_state(lm, args.state_data, args.state_utterances, args.state_group)
            for label, c, n in rows:
                print(f"| {label} | {precision} | {100 * c.wer:.2f} % | {100 * c.cer:.2f} % | {n} |",
                      flush=True)

    if args.memory_minutes:
        name, beam = list(decoders.items())[-1]
        lm = models[args.precision[-1]]
        print(f"\n| continuous audio ({name}, 100 ms chunks, {args.precision[-1]}) | RSS |")
        print("|---|---:|")
        for label, mb in memory(lm, program, args.memory_minutes, beam=beam):
            print(f"| {label} | {mb:.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
