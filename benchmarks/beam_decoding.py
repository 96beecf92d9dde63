"""Greedy vs beam search (+ word n-gram LM) on dev corpora: WER, CER and decoding cost, and sweeps.

    python benchmarks/beam_decoding.py --model runs/bigru/best.pt --data DEV [--data DEV2] \\
        [--limit N] [--lm models/lm.arpa.gz [OTHER.arpa.gz ...]] [--lm-weight 0.4 0.6 0.8] \\
        [--word-score 0 0.5 1] [--beam-size 32] [--pyctcdecode]

The acoustic model runs once per utterance (its time is measured separately); every decoder then
decodes the same log-probabilities. For each corpus the table gives corpus WER/CER and the decoding
real-time factor (decoder seconds / audio seconds) of greedy decoding and of the beam search for
every (lm weight, word score, beam size) in the grid (times are CPU seconds of this process,
which a busy shared machine distorts far less than wall time); `--pyctcdecode` adds pyctcdecode + KenLM
(an alternative library, not a dependency) with the same LM, weight and word score, for the
comparison behind the choice of flashlight-text. The model's own RTF is printed per corpus; the
end-to-end RTF of a decoder is model RTF + decoder RTF. Several `--lm` files are compared on the
same log-probabilities, each with its perplexity on the corpus' transcripts (`asr.lm.perplexity`;
OOV words are not scored, and their rate is printed). Use dev splits only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log_probs_of(lm, utts):
    """Per utterance (T', V) CPU log-probabilities, and the model's CPU seconds."""
    import torch

    from asr.audio import load_audio

    out, seconds = [], 0.0
    for u in utts:
        wave = load_audio(u.path, lm.feature_config.sample_rate)
        t0 = time.process_time()
        feats = lm.features(wave)
        with torch.inference_mode():
            lp, _ = lm.model(feats[None], torch.tensor([feats.shape[0]]))
        seconds += time.process_time() - t0
        out.append(lp[0].float().contiguous())
    return out, seconds


def run_greedy(lm, lps):
    import torch

    from asr.decoding import greedy_decode

    hyps = []
    for lp in lps:
        hyps.append(lm.vocab.decode(greedy_decode(lp[None], torch.tensor([lp.shape[0]]))[0]))
    return hyps


def run_beam(lm, lps, cfg):
    from asr.beam import BeamCTCStream, emissions_text

    dec = BeamCTCStream(lm.vocab, cfg)
    hyps = []
    for lp in lps:
        dec.reset()
        dec.push(lp)
        hyps.append(emissions_text(dec.finish(), lm.vocab))
    return hyps


def make_pyctcdecode(lm, lm_path, alpha, beta):
    from pyctcdecode import build_ctcdecoder

    from asr.lm import BOS, EOS, UNK, arpa_vocabulary

    labels = ["", *lm.vocab.chars]
    unigrams = [w for w in arpa_vocabulary(lm_path) if w not in (BOS, EOS, UNK)]
    # pyctcdecode multiplies log10 scores by alpha * ln(10): alpha = lm_weight / ln(10) matches
    return build_ctcdecoder(labels, str(lm_path), unigrams, alpha=alpha, beta=beta)


def run_pyctcdecode(decoder, lps, beam_size):
    return [decoder.decode(lp.numpy(), beam_width=beam_size) for lp in lps]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", action="append", required=True, help="LibriSpeech-layout dev corpus")
    ap.add_argument("--limit", type=int, default=0, help="first N utterances per corpus (0: all)")
    ap.add_argument("--lm", nargs="+", default=None,
                    help="ARPA LM(s) (default: the shipped models/lm.arpa.gz)")
    ap.add_argument("--lm-weight", type=float, nargs="+", default=None)
    ap.add_argument("--word-score", type=float, nargs="+", default=None)
    ap.add_argument("--beam-size", type=int, nargs="+", default=None)
    ap.add_argument("--pyctcdecode", action="store_true", help="also run pyctcdecode + kenlm")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from asr.beam import DEFAULT_LM, BeamConfig
    from asr.checkpoint import load_model
    from asr.data import load_corpora
    from asr.evaluate import error_counts
    from asr.lm import LMError, perplexity, read_arpa

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    base = BeamConfig()
    lm_paths = [str(p) for p in args.lm or [DEFAULT_LM]]
    weights = args.lm_weight or [base.lm_weight]
    scores = args.word_score or [base.word_score]
    sizes = args.beam_size or [base.beam_size]
    for path in lm_paths:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            run_beam(lm, [], BeamConfig(lm_path=path))  # load each LM once, outside the timings
        except LMError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"LM load: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s "
              f"CPU ({path}, {Path(path).stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    arpa = {}  # parsed in Python for the perplexities; a KenLM binary file gets none
    for path in lm_paths:
        try:
            arpa[path] = read_arpa(path)
        except LMError:
            print(f"{path}: not ARPA text, no perplexity", file=sys.stderr)
    rows = []
    for data in args.data:
        utts, _ = load_corpora([data], lm.vocab, skip_bad=True)
        utts = sorted(utts, key=lambda u: u.id)[: args.limit or None]
        audio_s = sum(u.duration for u in utts)
        refs = [u.text for u in utts]
        lps, model_s = log_probs_of(lm, utts)
        name = Path(data).name if Path(data).name != "dev" else Path(data).parent.parent.name
        print(f"{name}: {len(utts)} utterances, {audio_s / 60:.1f} min, model RTF (CPU) "
              f"{model_s / audio_s:.4f}", file=sys.stderr)

        def record(decoder, setting, hyps, seconds, name=name, refs=refs, audio_s=audio_s):
            c = error_counts(refs, hyps)
            rows.append((name, decoder, setting, 100 * c.wer, 100 * c.cer, seconds / audio_s))
            print(f"  {decoder:12s} {setting:40s} WER {100 * c.wer:6.2f}  CER {100 * c.cer:6.2f}"
                  f"  RTF {seconds / audio_s:.4f}", file=sys.stderr, flush=True)

        t0 = time.process_time()
        hyps = run_greedy(lm, lps)
        record("greedy", "-", hyps, time.process_time() - t0)
        ppl = {}
        for path, model in arpa.items():
            p = perplexity(model, [r.split() for r in refs])
            ppl[path] = f" (ppl {p.perplexity:.0f}, OOV {100 * p.oov_rate:.1f} %)"
        for path, w, s, b in itertools.product(lm_paths, weights, scores, sizes):
            setting = f"w={w:g} s={s:g} beam={b}{ppl.get(path, '')}"
            if len(lm_paths) > 1:
                setting = f"{Path(path).name} {setting}"
            cfg = BeamConfig(lm_path=path, lm_weight=w, word_score=s, beam_size=b)
            t0 = time.process_time()
            hyps = run_beam(lm, lps, cfg)
            record("beam", setting, hyps, time.process_time() - t0)
            if args.pyctcdecode:
                c0 = time.process_time()
                dec = make_pyctcdecode(lm, path, w / 2.302585, s)
                print(f"  pyctcdecode LM load: {time.process_time() - c0:.1f} s CPU", file=sys.stderr)
                t0 = time.process_time()
                hyps = run_pyctcdecode(dec, lps, b)
                record("pyctcdecode", setting, hyps, time.process_time() - t0)
    print("| corpus | decoder | setting | WER % | CER % | decoder RTF (CPU) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.4f} |")


if __name__ == "__main__":
    main()
