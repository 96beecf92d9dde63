"""Probe: would subword (BPE) output units beat characters for the BiGRU's greedy decoding?

Characters spell by ear: the shipped BiGRU's greedy WER is about 2.8x its CER, because one wrong
letter costs a whole word. Word pieces make the network itself choose among spellings it has seen.
This probe asks what that buys without a new model: it loads a character checkpoint, replaces its
classifier by a fresh one over a sentencepiece BPE vocabulary trained on the training transcripts
(never on dev text), trains the new head alone for `--freeze` steps, then the whole network
(linear warm-up, cosine decay), and logs greedy librispeech-dev WER/CER every `--eval-every` steps.
The recipe is the later fine-tuning cycles' (librispeech-train weighted 5, speed + gain + VTLP, 240 s
batches). `asr` itself has no subword units: this is a measurement, not a product path (results in
models/README.md, "Twenty-fourth session").

Needs `pip install sentencepiece` (not a dependency of the package). Resumable: OUT/state.pt is
rewritten atomically every `--save-every` steps; the same command continues from it, and a larger
`--steps` re-plans the cosine schedule over the run's new length. Run from the repository root:

    python scripts/subword_probe.py --out ../runs/bpe256 --steps 1200   # the measured run's length
    python scripts/subword_probe.py --out ../runs/bpe256 --eval-only   # dev splits, both heads
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from asr.checkpoint import CheckpointError, atomic_save, model_from_checkpoint, read_checkpoint  # noqa: E402
from asr.data import DurationBatchSampler, SpeechDataset, augment_config, collate, scan_corpora  # noqa: E402
from asr.decoding import greedy_decode  # noqa: E402
from asr.evaluate import error_counts  # noqa: E402
from asr.lm import LMError, arpa_vocabulary  # noqa: E402

TRAIN = [("librispeech-train", 5.0), ("synth/LibriSpeech/train", 0.15),
         ("ljspeech/LibriSpeech/train", 1.0), ("fsdd", 1.0)]
DEV = {"librispeech-dev": "librispeech-dev", "synth-dev": "synth/LibriSpeech/dev",
       "ljspeech-dev": "ljspeech/LibriSpeech/dev"}


class PieceVocab:
    """Sentencepiece pieces behind the CTC blank (index 0): piece k is class k + 1."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def __len__(self) -> int:
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i - 1 for i in ids if i > 0])


def train_tokenizer(out: Path, texts: list[str], vocab_size: int) -> None:
    import sentencepiece as spm  # checked in main()

    source = out / "tokenizer_text.txt"
    source.write_text("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(source), model_prefix=str(out / ".sp-partial"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        num_threads=2, minloglevel=2)
    os.replace(out / ".sp-partial.vocab", out / "sp.vocab")
    os.replace(out / ".sp-partial.model", out / "sp.model")  # last: its presence means both are whole


def non_words(texts: list[str], words: set[str]) -> str:
    """Share of the written words that are not in `words`, e.g. "27.8 % of 1583"."""
    written = [w for t in texts for w in t.split()]
    return f"{100 * sum(w not in words for w in written) / max(1, len(written)):.1f} % of {len(written)}"


@torch.no_grad()
def dev_errors(model, ds: SpeechDataset, vocab: PieceVocab) -> tuple[float, float, list[str]]:
    model.eval()
    hyps = []
    for i in range(len(ds)):
        f = ds.features(i)
        lp, n = model(f[None], torch.tensor([f.shape[0]]))
        hyps.append(vocab.decode(greedy_decode(lp, n)[0]))
    model.train()
    ec = error_counts([u.text for u in ds.utts], hyps)
    return ec.wer, ec.cer, hyps


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", default="../shared/data", type=Path)
    ap.add_argument("--init", default="models/bigru.pt", help="character checkpoint to start from")
    ap.add_argument("--vocab-size", type=int, default=256, help="sentencepiece pieces (BPE)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--freeze", type=int, default=100, help="first steps train the new head alone")
    ap.add_argument("--lr-head", type=float, default=2e-3, help="peak (halved once all train)")
    ap.add_argument("--lr-enc", type=float, default=3e-4, help="peak for the rest of the network")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-seconds", type=float, default=240)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--eval-only", action="store_true",
                    help="decode every dev split with the pieces and with --init's characters, and stop")
    ap.add_argument("--lm", default="models/lm.arpa.gz",
                    help="--eval-only counts the written words outside this LM's vocabulary")
    a = ap.parse_args()
    if min(a.vocab_size, a.steps, a.warmup, a.batch_seconds, a.eval_every, a.save_every, a.threads) <= 0:
        ap.error("--vocab-size, --steps, --warmup, --batch-seconds, --eval-every, --save-every and "
                 "--threads must be positive")
    if not 0 <= a.freeze < a.steps:
        ap.error("--freeze must be at least 0 and less than --steps")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        sys.exit("error: this probe needs sentencepiece (pip install sentencepiece)")
    if a.eval_only and not (a.out / "state.pt").exists():
        sys.exit(f"error: {a.out / 'state.pt'} does not exist: nothing trained to evaluate")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    loaded = model_from_checkpoint(read_checkpoint(a.init), a.init)
    model, fcfg, stats, chars = loaded.model, loaded.feature_config, loaded.stats, loaded.vocab
    groups, _ = scan_corpora([str(a.data / p) for p, _ in TRAIN], chars)
    if not all(groups):
        missing = [p for (p, _), g in zip(TRAIN, groups, strict=True) if not g]
        sys.exit(f"error: no usable utterances in {', '.join(str(a.data / p) for p in missing)}")
    utts, weights = [], []
    for (_, w), group in zip(TRAIN, groups, strict=True):
        utts += group
        weights += [w] * len(group)
    if not (a.out / "sp.model").exists():
        train_tokenizer(a.out, [u.text for u in utts], a.vocab_size)
    vocab = PieceVocab(a.out / "sp.model")
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model.classifier = torch.nn.Linear(model.classifier.in_features, len(vocab))
    head = list(model.classifier.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": body}, {"params": head}], lr=0.0, weight_decay=0.01)
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if (a.out / "state.pt").exists():
        saved = torch.load(a.out / "state.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"])
        st = saved["st"]
        print(f"resumed at step {st['step']}", flush=True)
    if a.eval_only:  # beside the character model it started from; non-words: outside the LM's words
        words = set(arpa_vocabulary(a.lm))
        start = model_from_checkpoint(read_checkpoint(a.init), a.init).model
        for name, path in DEV.items():
            dev = SpeechDataset(scan_corpora([str(a.data / path)], chars)[0][0], chars, fcfg, stats)
            print(f"{name}, references: non-words {non_words([u.text for u in dev.utts], words)}")
            for label, m, v in ((f"{a.init} (characters)", start, chars),
                                (f"step {st['step']} (pieces)", model, vocab)):
                wer, cer, hyps = dev_errors(m, dev, v)
                print(f"{name}, {label}: greedy WER {100 * wer:.1f} % CER {100 * cer:.1f} %, "
                      f"non-words {non_words(hyps, words)}")
            (a.out / f"hyps-{name}-{st['step']}.txt").write_text("\n".join(hyps) + "\n")
        return
    dev = SpeechDataset(scan_corpora([str(a.data / DEV["librispeech-dev"])], chars)[0][0], chars, fcfg,
                        stats)
    ds = SpeechDataset(utts, vocab, fcfg, stats, augment_config(["speed", "gain", "vtlp"]))
    sampler = DurationBatchSampler([u.duration for u in utts], a.batch_seconds, a.seed, weights,
                                   augment=True)

    def lrs(step: int) -> tuple[float, float]:
        if step < a.freeze:
            return 0.0, a.lr_head * min(1.0, (step + 1) / a.warmup)
        s, total = step - a.freeze, a.steps - a.freeze
        f = min(1.0, (s + 1) / a.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        return a.lr_enc * f, a.lr_head * 0.5 * f

    def save() -> None:
        atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                     "st": st}, a.out / "state.pt")

    log_path = a.out / "log.jsonl"
    if log_path.exists():  # rows logged after the last save would repeat once resumed
        kept = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= st["step"]]
        log_path.write_text("".join(r + "\n" for r in kept))
    log = open(log_path, "a")

    def write(row: dict) -> None:
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    model.train()
    t0, losses, audio = time.time(), [], 0.0
    while st["step"] < a.steps:
        sampler.set_epoch(st["epoch"], skip=st["batch_in_epoch"])
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=1, prefetch_factor=4)
        for batch in loader:
            lr_body, lr_head = lrs(st["step"])
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_body, lr_head
            if body[0].requires_grad != (st["step"] >= a.freeze):  # the head trains alone first
                for p in body:
                    p.requires_grad_(st["step"] >= a.freeze)
            lp, n = model(batch["feats"], batch["lengths"])
            loss = F.ctc_loss(lp.transpose(0, 1).float(), batch["targets"], n, batch["target_lengths"],
                              blank=0, reduction="sum", zero_infinity=True) / lp.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
            opt.step()
            st["step"] += 1
            st["batch_in_epoch"] += 1
            losses.append(loss.item())
            audio += float(batch["lengths"].sum()) / 100
            if st["step"] % 10 == 0:
                write({"step": st["step"], "loss": sum(losses) / len(losses), "lr_enc": lr_body,
                       "lr_head": lr_head, "audio_s_per_s": audio / (time.time() - t0),
                       "time": time.time()})
                t0, losses, audio = time.time(), [], 0.0
            if st["step"] % a.save_every == 0:
                save()
            if st["step"] % a.eval_every == 0 or st["step"] == a.steps:
                wer, cer, _ = dev_errors(model, dev, vocab)
                write({"step": st["step"], "dev_wer": wer, "dev_cer": cer, "time": time.time()})
                t0 = time.time()
            if st["step"] >= a.steps:
                break
        else:
            st["epoch"] += 1
            st["batch_in_epoch"] = 0
    save()


def main() -> None:
    try:
        run()
    except (CheckpointError, LMError, OSError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # sentencepiece's complaints, e.g. a vocabulary too large for the text
        sys.exit(f"error: {str(e).strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
