"""`asr`: command-line front end over the `asr` library (transcribe, listen, train, evaluate, export).

Exit codes: 0 success; 1 an input, model or corpus could not be used (one-line message on stderr);
2 invalid command-line usage (a bad value, or options that do not go together); 130 interrupted
(training after saving a checkpoint; `listen` before capture started).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _usage(msg: str) -> None:
    """Options that do not go together: invalid usage (exit 2, with the command's usage line)."""
    raise click.UsageError(msg, click.get_current_context(silent=True))


class _Finite:
    """Mixin for click float types: also refuse nan and inf (which pass FloatRange's bound checks)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class FiniteFloatRange(_Finite, click.FloatRange):
    """A bounded float, finite."""


class FiniteFloat(_Finite, click.types.FloatParamType):
    """A float with no bounds but finite (FiniteFloatRange() would show a range "x<=None")."""


class NonEmptyPath(click.Path):
    """click.Path that refuses "" (which would otherwise mean the default, or the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("an empty path is not a path.", param, ctx)
        return super().convert(value, param, ctx)


THREADS = click.IntRange(1, 1024)  # far more makes OpenMP crash instead of erring


def _threads(n: int | None, streaming: bool = False) -> None:
    """--threads, or by default all cores; one for streaming, whose per-chunk work is too small to
    share: more threads only spin-wait between chunks, which on a busy CPU made streamed decoding
    up to 100x slower (measured: RTF 1.67 with 2 threads against 0.013 with 1, during training)."""
    import torch

    if n or streaming:
        torch.set_num_threads(n or 1)


def _load(model_path: str | None, streaming: bool, device: str = "cpu", precision: str = "float32"):
    """Load a checkpoint (default: the shipped one for this path) or exit with a clear message."""
    from asr.checkpoint import CheckpointError, default_model_path, load_model

    path = model_path or str(default_model_path(streaming))
    if model_path is None and not os.path.exists(path):
        _fail(f"default model {path} is missing: reinstall from a full checkout, or train one with "
              f"`asr train` and pass it with --model")
    if device == "cuda":
        import torch

        if precision != "float32":
            _usage(f"--precision {precision} is for --device cpu (on a GPU the model is fast in float32)")
        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA GPU is available")
    try:
        return load_model(path, device, precision)
    except CheckpointError as e:
        _fail(str(e))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def decoder_options(fn):
    """--decoder, --lm, --beam-size, --lm-weight, --word-score, passed on as `decoding`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, decoder, lm_path, beam_size, lm_weight, word_score, **kwargs):
        return fn(*args, decoding=(decoder, lm_path, beam_size, lm_weight, word_score), **kwargs)

    options = [
        click.option("--decoder", type=click.Choice(["beam", "greedy"]), default="beam",
                     show_default=True, help="beam: CTC beam search with a word n-gram language "
                     "model; greedy: best path, no language model (faster, spells by ear)."),
        click.option("--lm", "lm_path", type=NonEmptyPath(dir_okay=False),
                     help="Word n-gram LM for --decoder beam: ARPA, plain or .gz "
                     "(default: models/lm.arpa.gz)."),
        click.option("--beam-size", type=click.IntRange(min=1),
                     help="Hypotheses kept per frame (default: 128)."),
        click.option("--lm-weight", type=FiniteFloatRange(min=0),
                     help="Weight of the LM's log10 probabilities (default: tuned on dev)."),
        click.option("--word-score", type=FiniteFloat(),
                     help="Score added per word; higher favours more words (default: tuned on dev)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def streaming_options(note: str = ""):
    """--chunk-ms, --endpoint-ms and --speaker-changes, shared by `transcribe --stream` and
    `listen`."""
    chunk = click.option("--chunk-ms", type=click.IntRange(min=10), default=100, show_default=True,
                         help=f"Audio chunk size{note}.")
    endpoint = click.option("--endpoint-ms", type=click.IntRange(min=40), default=800,
                            show_default=True, help=f"Trailing silence that closes an utterance{note}.")
    speakers = click.option("--speaker-changes", is_flag=True,
                            help=f"The speaker may change at pauses (a meeting, a broadcast): "
                            f"the model's running mean starts afresh at each endpoint instead of "
                            f"carrying the last voice's for about its window (10 s in the shipped "
                            f"models; no effect on a model without one){note}.")
    return lambda fn: chunk(endpoint(speakers(fn)))


precision_option = click.option(  # the choices are asr.model.PRECISIONS (kept torch-free here)
    "--precision", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
    help="Arithmetic of the recurrent layers, most of the model's work: bfloat16 halves the "
    "weight memory they read per frame and is faster on CPUs with native bfloat16 (e.g. "
    "AVX512-BF16), at nearly the same accuracy (measured in the README, under asr listen).")


def _beam_config(decoding, vocab):
    """The BeamConfig for --decoder beam (LM loaded and checked here), None for greedy."""
    decoder, lm_path, beam_size, lm_weight, word_score = decoding
    if decoder == "greedy":
        if any(v is not None for v in (lm_path, beam_size, lm_weight, word_score)):
            _usage("--lm, --beam-size, --lm-weight and --word-score need --decoder beam")
        return None
    from asr.beam import DEFAULT_LM, BeamConfig, load_lexicon
    from asr.lm import LMError

    if lm_path is None and not DEFAULT_LM.exists():
        _fail(f"default language model {DEFAULT_LM} is missing: reinstall from a full checkout, "
              f"pass one with --lm, or use --decoder greedy")
    given = {"lm_path": lm_path, "beam_size": beam_size, "lm_weight": lm_weight,
             "word_score": word_score}
    try:
        cfg = BeamConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        _fail(f"beam search: {e}")
    try:
        load_lexicon(cfg.lm_path, vocab.chars)
    except ImportError:
        _fail("--decoder beam needs the flashlight-text package (pip install flashlight-text); "
              "or use --decoder greedy")
    except LMError as e:
        _fail(str(e))
    return cfg


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="asr-gru")
def cli():
    """Small, fast, trainable streaming speech recognizer (GRU + CTC)."""


@cli.command()
@click.argument("audio", nargs=-1, required=True)
@click.option("--model", "model_path", type=NonEmptyPath(), help="Checkpoint (default: models/bigru.pt, or "
              "models/gru-stream.pt with --stream).")
@click.option("--format", "fmt", type=click.Choice(["txt", "json", "srt", "vtt", "jsonl"]),
              default="txt", show_default=True,
              help="Output format; jsonl (with --stream): every partial and final event, one per "
              "line, as `asr listen --format jsonl` prints them.")
@click.option("--output-dir", type=NonEmptyPath(file_okay=False),
              help="Write one file per input (NAME.FORMAT) here instead of printing.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=THREADS,
              help="CPU threads for the model (default: all cores; 1 with --stream).")
@click.option("--stream", is_flag=True, help="Decode through the live streaming path "
              "(unidirectional model), printing events as they happen.")
@click.option("--realtime", is_flag=True, help="With --stream: feed the audio at speaking speed.")
@streaming_options(" (with --stream)")
@precision_option
@decoder_options
def transcribe(audio, model_path, fmt, output_dir, device, threads, stream, realtime, chunk_ms,
               endpoint_ms, speaker_changes, precision, decoding):
    """Transcribe audio files (WAV, FLAC, Ogg Vorbis/Opus, MP3; any rate and channel count).

    \b
    Examples:
      asr transcribe samples/9300-1-0088.flac
      asr transcribe --format srt --output-dir subs/ talk.mp3 interview.wav
      asr transcribe --stream --realtime samples/9300-1-0087.flac
      asr transcribe --stream --format jsonl samples/9300-1-0087.flac
    """
    from asr.audio import AudioError, load_audio
    from asr.transcribe import format_transcript, transcribe_file

    if fmt == "jsonl" and not stream:
        _usage("--format jsonl is the event stream of --stream; use --format json for a "
              "whole-file transcript")
    _threads(threads, streaming=stream)
    lm = _load(model_path, streaming=stream, device=device, precision=precision)
    if stream and lm.model.cfg.bidirectional:
        _fail(f"{lm.path}: --stream needs a unidirectional model (e.g. models/gru-stream.pt)")
    beam = _beam_config(decoding, lm.vocab)
    if output_dir:
        names = [os.path.splitext(os.path.basename(p))[0] for p in audio]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            _fail(f"--output-dir: several inputs would write {clash[0]}.{fmt}; rename them or "
                  f"transcribe them separately")
        inputs = {os.path.realpath(p) for p in audio}
        for n in names:
            if os.path.realpath(os.path.join(output_dir, f"{n}.{fmt}")) in inputs:
                _fail(f"--output-dir: the transcript {n}.{fmt} would overwrite an input file; "
                      f"choose another folder")
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            _fail(f"--output-dir {output_dir}: {e.strerror or e}")
    from tqdm import tqdm

    failed = 0
    show_bar = len(audio) > 1 and not stream
    # disable=None: no bar when stderr is not a terminal (a log file would get its redraws)
    for path in tqdm(audio, disable=None if show_bar else True, unit="file", file=sys.stderr,
                     leave=False):
        events = None  # jsonl events of --stream --output-dir
        try:
            if stream:
                wave = load_audio(path, lm.feature_config.sample_rate)
            else:  # block by block: bounded memory for any length
                t = transcribe_file(lm, path, beam=beam)
        except AudioError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if stream:
            import io

            from asr.live import run_file_stream

            events = io.StringIO() if output_dir and fmt == "jsonl" else None
            t = run_file_stream(lm, wave, chunk_ms=chunk_ms, endpoint_ms=endpoint_ms,
                                realtime=realtime, beam=beam,
                                echo=fmt == "jsonl" or (output_dir is None and fmt == "txt"),
                                fmt="jsonl" if fmt == "jsonl" else "text", out=events,
                                extra={"file": path} if fmt == "jsonl" else None,
                                restart_mean_on_endpoint=speaker_changes)
        if events is not None:
            text = events.getvalue()
        elif stream and fmt == "jsonl":
            continue  # printed as it happened
        else:
            text = format_transcript(t, fmt)
        if output_dir:
            base = os.path.splitext(os.path.basename(path))[0]
            out_path = os.path.join(output_dir, f"{base}.{fmt}")
            try:
                _write_atomic(out_path, text)
            except OSError as e:
                tqdm.write(f"error: {out_path}: cannot write ({e.strerror or e})", file=sys.stderr)
                failed += 1
        elif not (stream and fmt == "txt"):  # already printed as it happened
            click.echo(text, nl=False)
    if failed:
        raise SystemExit(1)


@cli.command()
@click.option("--model", "model_path", type=NonEmptyPath(), help="Streaming checkpoint (default: models/gru-stream.pt).")
@click.option("--input-device", help="Microphone: device ID or part of its name (default: the "
              "system's default input).")
@click.option("--list-devices", is_flag=True, help="List the input devices and exit.")
@streaming_options()
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]),
              help="text: partial line redrawn, final lines kept; jsonl: one event per line "
              "(default: text on a terminal, jsonl otherwise).")
@click.option("--max-seconds", type=FiniteFloatRange(min=0, min_open=True),
              help="Stop after this much audio (default: until Ctrl-C).")
@click.option("--save-audio", type=NonEmptyPath(dir_okay=False), help="Also save the audio (16-bit WAV).")
@precision_option
@decoder_options
def listen(model_path, input_device, list_devices, chunk_ms, endpoint_ms, speaker_changes, fmt,
           max_seconds, save_audio, precision, decoding):
    """Transcribe the microphone live; Ctrl-C finishes the current utterance and stops.

    \b
    Examples:
      asr listen
      asr listen --input-device USB --format jsonl --save-audio talk.wav
    """
    from asr.mic import Microphone, MicrophoneError
    from asr.mic import list_devices as input_devices

    try:
        if list_devices:
            click.echo("\n".join(d.describe() for d in input_devices()) or "no input devices")
            return
        lm = _load(model_path, streaming=True, precision=precision)
        if lm.model.cfg.bidirectional:
            _fail(f"{lm.path}: listen needs a unidirectional model (e.g. models/gru-stream.pt)")
        beam = _beam_config(decoding, lm.vocab)
        from asr.live import listen as run_listen

        _threads(None, streaming=True)
        with Microphone(input_device, lm.feature_config.sample_rate, chunk_ms) as mic:
            click.echo(f"listening on {mic.device.name!r} at {mic.sample_rate} Hz "
                       f"(Ctrl-C to stop)", err=True)
            r = run_listen(lm, mic, fmt or ("text" if sys.stdout.isatty() else "jsonl"),
                           endpoint_ms, max_seconds, save_audio, beam=beam,
                           restart_mean_on_endpoint=speaker_changes)
    except (MicrophoneError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:  # before capture started; during it, listen() handles Ctrl-C
        raise SystemExit(130) from None
    click.echo(f"listened {r.seconds:.1f} s from {mic.device.name!r} at {r.sample_rate} Hz, "
               f"{r.utterances} utterances, {r.overflows} input overflows", err=True)
    if r.error:
        _fail(f"{r.error}; the text above is what was recognised until then")


def _augment_kinds(ctx, param, value: str) -> str:
    from asr.data import parse_augment_kinds

    try:
        return ",".join(parse_augment_kinds(value)) or "none"
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@click.option("--train", "train_paths", type=NonEmptyPath(), multiple=True, required=True,
              help="Training corpus folder (repeatable); PATH:WEIGHT repeats it WEIGHT times per epoch.")
@click.option("--dev", "dev_paths", type=NonEmptyPath(), multiple=True, help="Dev corpus folder for WER (repeatable).")
@click.option("--out", required=True, type=NonEmptyPath(file_okay=False), help="Run folder.")
@click.option("--arch", type=click.Choice(["bigru", "gru"]), default="bigru", show_default=True,
              help="bigru: bidirectional, offline; gru: unidirectional, streaming.")
@click.option("--cell", type=click.Choice(["gru", "lstm", "rnn"]), default="gru", show_default=True)
@click.option("--hidden-size", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--num-layers", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--conv-channels", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dropout", type=FiniteFloatRange(0, 0.9), default=0.15, show_default=True)
@click.option("--subsampling", type=click.Choice(["2", "4"]),
              help="Input frames (10 ms) per output frame: 4 (40 ms) or 2 (20 ms: twice the recurrent "
                   "work; characters then have room). Default: the --init-from model's, else 4.")
@click.option("--cmn-window", type=click.IntRange(min=0),
              help="Subtract a causal running mean from the normalised features, averaged over up to this "
                   "many 10 ms frames (0: off; e.g. 1000). Default: the --init-from model's, else off.")
@click.option("--cmn-floor-gate", type=FiniteFloatRange(min=0),
              help="With --cmn-window: only frames louder than a tracked noise floor by more than this "
                   "(normalised units, e.g. 0.5) update the running mean, so pauses and steady noise do "
                   "not drag it (0: every frame). Default: the --init-from model's, else 0.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=0), default=0, help="Stop after N steps (overrides --epochs).")
@click.option("--batch-seconds", type=FiniteFloatRange(min=1), default=240.0, show_default=True)
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=1.5e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-augment", is_flag=True, help="No augmentation at all (the same as --augment none).")
@click.option("--augment", "augment_kinds", default="speed,gain,noise,specaugment", show_default=True,
              callback=_augment_kinds,
              help="Augmentations to use, comma-separated: speed, gain, noise, specaugment, freqmask (SpecAugment's "
                   "frequency masks alone), vtlp; or none.")
@click.option("--init-from", type=NonEmptyPath(dir_okay=False),
              help="Start from this checkpoint's weights and feature statistics (a new run with its "
                   "own recipe, e.g. fine-tuning with other augmentation).")
@click.option("--teacher", type=NonEmptyPath(dir_okay=False),
              help="Distil from this model: add the frame-wise KL divergence from its CTC posteriors "
                   "(e.g. the offline BiGRU's) to the student's CTC loss.")
@click.option("--distill-weight", type=FiniteFloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Weight of the distillation loss (with --teacher; the logged loss includes it).")
@click.option("--distill-delay", type=click.IntRange(min=0), default=0, show_default=True,
              help="Output frames (40 or 20 ms) the student lags the teacher: a streaming student emits "
                   "later than a bidirectional teacher (with --teacher).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=THREADS, help="CPU threads per process.")
@click.option("--num-workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Data loading processes.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, help="Dev WER every N steps too.")
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--keep-last", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip and count corpus problems instead of stopping: "
              "bad transcript lines, missing, unreadable or too short audio, and audio that fails "
              "to decode past its header (each reported).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--debug-ranks", is_flag=True, hidden=True)
def train(train_paths, dev_paths, out, arch, cell, hidden_size, num_layers, conv_channels, dropout, subsampling,
          cmn_window, cmn_floor_gate, epochs, max_steps, batch_seconds, lr, warmup_steps, seed, no_augment,
          augment_kinds, init_from, teacher, distill_weight, distill_delay, device, threads,
          num_workers, eval_every, save_every, keep_last, log_every, skip_bad, resume, debug_ranks):
    """Train a CTC model on LibriSpeech-layout corpora (also under torchrun for several processes).

    \b
    Examples:
      asr train --train data/train-clean-100 --dev data/dev-clean --out runs/bigru
      asr train --train real/:2 --train synth/ --dev dev/ --out runs/gru --arch gru --resume
      torchrun --nproc_per_node=4 -m cli train --train ... --out runs/ddp --device cuda

    Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and exits with 130;
    --resume then continues exactly. Corpus problems stop the run before training (exit 1).
    """
    import torch

    from asr.checkpoint import CheckpointError
    from asr.data import CorpusError
    from asr.train import TrainConfig, TrainingInterrupted
    from asr.train import train as run_training

    if not teacher and (distill_weight != 1.0 or distill_delay):
        _usage("--distill-weight and --distill-delay need --teacher (the model to distil from)")
    _threads(threads)
    cfg = TrainConfig(train=tuple(train_paths), dev=tuple(dev_paths), out=out, arch=arch, cell=cell,
                      hidden_size=hidden_size, num_layers=num_layers, conv_channels=conv_channels,
                      subsampling=int(subsampling or 0), cmn_window=-1 if cmn_window is None else cmn_window,
                      cmn_floor_gate=-1.0 if cmn_floor_gate is None else cmn_floor_gate,
                      dropout=dropout, epochs=epochs, max_steps=max_steps,
                      batch_seconds=batch_seconds, lr=lr, warmup_steps=warmup_steps, seed=seed,
                      augment=not no_augment, augment_kinds=augment_kinds, init_from=init_from or "",
                      teacher=teacher or "", distill_weight=distill_weight, distill_delay=distill_delay,
                      device=device, num_workers=num_workers,
                      eval_every=eval_every, save_every=save_every, keep_last=keep_last,
                      log_every=log_every, skip_bad=skip_bad, debug_ranks=debug_ranks)
    try:
        best = run_training(cfg, resume=resume)
    except (CorpusError, CheckpointError, ValueError) as e:
        _fail(str(e))
    except torch.OutOfMemoryError:
        _fail(f"out of {'GPU ' if device != 'cpu' else ''}memory: start a new run with a smaller "
              f"--batch-seconds (now {batch_seconds:g})")
    except OSError as e:
        from asr.train import latest_checkpoint

        kept = latest_checkpoint(Path(out)) if Path(out).is_dir() else None
        _fail(f"training stopped: {e.strerror or e} ({e.filename or out}); " +
              (f"the last complete checkpoint ({kept.name}) is kept, continue with --resume"
               if kept else "no checkpoint was written"))
    except TrainingInterrupted as e:
        click.echo(f"\ninterrupted: {e}; continue with --resume", err=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted: continue with --resume (last complete checkpoint kept)", err=True)
        raise SystemExit(130) from None
    if best is not None:  # rank 0 (the others of a torchrun job print nothing)
        click.echo(f"model: {best}")


@cli.command()
@click.option("--data", "data_paths", type=NonEmptyPath(), multiple=True, required=True,
              help="LibriSpeech-layout corpus folder (repeatable).")
@click.option("--model", "model_path", type=NonEmptyPath(), help="Checkpoint (default: the shipped model for the path).")
@click.option("--stream", is_flag=True, help="Decode through the streaming path (100 ms chunks).")
@click.option("--report", type=NonEmptyPath(dir_okay=False), help="Write one JSON line per utterance.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--worst", type=click.IntRange(min=0), default=5, show_default=True,
              help="Aligned ref/hyp of the N worst utterances (text format).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=THREADS,
              help="CPU threads (default: all cores; 1 with --stream).")
@click.option("--skip-bad", is_flag=True, help="Skip and count corpus problems instead of stopping: "
              "bad transcript lines, missing, unreadable or too short audio, and audio that fails "
              "to decode past its header (each reported).")
@click.option("--sample", type=click.IntRange(min=1),
              help="Score N utterances drawn at random (always the same N for the same corpora).")
@precision_option
@decoder_options
def evaluate(data_paths, model_path, stream, report, fmt, worst, device, threads, skip_bad, sample,
             precision, decoding):
    """Word and character error rates of a model on LibriSpeech-layout corpora.

    \b
    Examples:
      asr evaluate --data ../shared/data/librispeech-dev --report dev.jsonl
      asr evaluate --data ../shared/data/librispeech-train --sample 46 --decoder greedy
    """
    import json

    from asr.audio import AudioError
    from asr.data import CorpusError, load_corpora, sample_utterances
    from asr.evaluate import align_pair, evaluate_utterances

    if report:  # before any decoding: a report that cannot be written would waste it all
        import tempfile

        try:
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(report)) or "."):
                pass
        except OSError as e:
            _fail(f"--report {report}: cannot write there ({e.strerror or e})")
    _threads(threads, streaming=stream)
    lm = _load(model_path, streaming=stream, device=device, precision=precision)
    if stream and lm.model.cfg.bidirectional:
        _fail(f"{lm.path}: --stream needs a unidirectional model (e.g. models/gru-stream.pt)")
    beam = _beam_config(decoding, lm.vocab)
    try:
        utts, skipped = load_corpora(list(data_paths), lm.vocab, skip_bad)
    except CorpusError as e:
        _fail(str(e))
    if sample:
        utts = sample_utterances(utts, sample)
    from tqdm import tqdm

    with tqdm(total=len(utts), unit="utt", file=sys.stderr, leave=False, disable=None) as bar:
        try:
            rep = evaluate_utterances(lm, utts, stream=stream, progress=bar.update, beam=beam,
                                      skip_bad=skip_bad)
        except AudioError as e:  # damage the corpus scan (headers only) could not see
            _fail(f"{e} (--skip-bad skips such files)")
    if rep.skipped:
        click.echo(f"skipped {len(rep.skipped)} utterance(s) whose audio failed to decode "
                   f"(--skip-bad), e.g. {rep.skipped[0]}", err=True)
        skipped += len(rep.skipped)
        if not rep.utterances:
            _fail("none of the utterances could be decoded (--skip-bad left them all out)")
    if report:
        lines = "".join(json.dumps({"id": r.id, "ref": r.ref, "hyp": r.hyp, "errors": r.errors,
                                    "ref_words": r.ref_words}) + "\n" for r in rep.utterances)
        try:
            _write_atomic(report, lines)
        except OSError as e:
            _fail(f"--report {report}: cannot write ({e.strerror or e})")
    c = rep.counts
    summary = {"model": lm.path, "stream": stream, "precision": precision,
               "decoder": beam.to_dict() if beam else "greedy",
               "utterances": len(rep.utterances), "skipped": skipped,
               "hours": round(rep.audio_seconds / 3600, 4), "wer": round(c.wer, 5),
               "cer": round(c.cer, 5), "substitutions": c.substitutions, "deletions": c.deletions,
               "insertions": c.insertions, "ref_words": c.ref_words, "rtf": round(rep.rtf, 4)}
    if fmt == "json":
        click.echo(json.dumps(summary))
        return
    dec = (f"beam {beam.beam_size}, LM {beam.lm_path} (weight {beam.lm_weight:g}, word score "
           f"{beam.word_score:g})" if beam else "greedy")
    click.echo(f"model        {lm.path}{' (streaming)' if stream else ''}"
               f"{f', {precision}' if precision != 'float32' else ''}\n"
               f"decoder      {dec}\n"
               f"utterances   {len(rep.utterances)} ({summary['hours']:.2f} h){f', {skipped} skipped' if skipped else ''}\n"
               f"WER          {100 * c.wer:.2f} %  (S {c.substitutions}, D {c.deletions}, "
               f"I {c.insertions} / {c.ref_words} words)\n"
               f"CER          {100 * c.cer:.2f} %\n"
               f"RTF          {rep.rtf:.4f}")
    bad = sorted(rep.utterances, key=lambda r: (-r.errors / max(1, r.ref_words), r.id))[:worst]
    bad = [r for r in bad if r.errors]
    if bad:
        click.echo("\nworst utterances:")
        for r in bad:
            ref, hyp = align_pair(r.ref, r.hyp)
            click.echo(f"{r.id}  ({r.errors} errors / {r.ref_words} words)\n  REF: {ref}\n  HYP: {hyp}")


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=NonEmptyPath(dir_okay=False))
@click.argument("output", type=NonEmptyPath(dir_okay=False))
@click.option("--float32", "full", is_flag=True, help="Keep float32 weights (default: float16).")
def export(checkpoints, output, full):
    """Write an inference-only copy of a training checkpoint (small; float16 by default).

    Several checkpoints of one run are averaged weight by weight (e.g. its last few steps;
    measure on a dev split whether the average beats the last step).

    \b
    Examples:
      asr export runs/bigru/best.pt models/bigru.pt
      asr export runs/bigru/checkpoints/step-0000{1150,1175,1200}.pt models/bigru.pt
    """
    from asr.checkpoint import CheckpointError
    from asr.train import export_model

    try:
        meta = export_model(list(checkpoints), output, half=not full)
    except CheckpointError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{output}: cannot write ({e.strerror or e})")
    avg = f", average of {len(checkpoints)} checkpoints" if len(checkpoints) > 1 else ""
    click.echo(f"wrote {output} ({os.path.getsize(output) / 1e6:.1f} MB{avg}; step {meta.get('step', '?')})")


if __name__ == "__main__":
    cli()
