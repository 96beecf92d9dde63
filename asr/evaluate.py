"""Corpus decoding and word/character error rates (jiwer on `normalize_text` output, corpus-level)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jiwer
import torch

from .beam import BeamConfig, beam_decode_batch, emissions_text
from .checkpoint import LoadedModel
from .data import DurationBatchSampler, SpeechDataset, Utterance, collate
from .decoding import greedy_decode
from .text import normalize_text


@dataclass
class ErrorCounts:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    ref_chars: int
    char_errors: int = 0


@dataclass
class UtteranceResult:
    id: str
    ref: str
    hyp: str
    errors: int  # word edits (S + D + I)
    ref_words: int
    duration: float = 0.0


@dataclass
class EvalReport:
    counts: ErrorCounts
    utterances: list[UtteranceResult] = field(default_factory=list)
    audio_seconds: float = 0.0
    decode_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # with skip_bad: why each unscored utterance failed

    @property
    def rtf(self) -> float:
        return self.decode_seconds / self.audio_seconds if self.audio_seconds else 0.0


def error_counts(refs: Sequence[str], hyps: Sequence[str]) -> ErrorCounts:
    """Corpus WER/CER over normalised references and hypotheses (empty references are skipped)."""
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return ErrorCounts(0.0, 0.0, 0, 0, 0, 0, 0)
    r, h = [p[0] for p in pairs], [p[1] for p in pairs]
    w = jiwer.process_words(r, h)
    c = jiwer.process_characters(r, h)
    n_words = sum(len(x.split()) for x in r)
    n_chars = sum(len(x) for x in r)
    char_errors = c.substitutions + c.deletions + c.insertions
    return ErrorCounts(wer=w.wer, cer=c.cer, substitutions=w.substitutions, deletions=w.deletions,
                       insertions=w.insertions, ref_words=n_words, ref_chars=n_chars,
                       char_errors=char_errors)


def utterance_errors(ref: str, hyp: str) -> int:
    r, h = normalize_text(ref), normalize_text(hyp)
    if not r:
        return len(h.split())
    o = jiwer.process_words(r, h)
    return o.substitutions + o.deletions + o.insertions


def decode_utterances(lm: LoadedModel, utts: Sequence[Utterance], batch_seconds: float = 200.0,
                      num_workers: int = 0,
                      progress: Callable[[int], None] | None = None,
                      beam: BeamConfig | None = None,
                      skipped: list[tuple[str, str]] | None = None) -> list[str | None]:
    """Transcripts of whole utterances, batched by length (offline path); greedy, or a beam
    search with a word LM over each whole utterance when `beam` is given.

    An utterance whose audio fails to decode raises AudioError; when a `skipped` list is given,
    its (id, message) goes there instead and its transcript is None."""
    ds = SpeechDataset(utts, lm.vocab, lm.feature_config, lm.stats, augment=None,
                       skip_bad=skipped is not None)
    sampler = DurationBatchSampler([u.duration for u in utts], batch_seconds, augment=False)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers)
    index = {u.id: i for i, u in enumerate(utts)}
    hyps: list[str | None] = [""] * len(utts)
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                for uid, message in batch["skipped"]:
                    skipped.append((uid, message))
                    hyps[index[uid]] = None
                if progress and batch["skipped"]:
                    progress(len(batch["skipped"]))
                if batch["feats"] is None:
                    continue
                lp, lengths = model(batch["feats"].to(lm.device), batch["lengths"])
                if beam is None:
                    texts = [lm.vocab.decode(ids) for ids in greedy_decode(lp, lengths)]
                else:
                    texts = [emissions_text(em, lm.vocab)
                             for em in beam_decode_batch(lp.cpu(), lengths, lm.vocab, beam)]
                for uid, text in zip(batch["ids"], texts, strict=True):
                    hyps[index[uid]] = text
                if progress:
                    progress(len(batch["ids"]))
    finally:
        model.train(was_training)
    return hyps


def evaluate_utterances(lm: LoadedModel, utts: Sequence[Utterance], stream: bool = False,
                        progress: Callable[[int], None] | None = None,
                        beam: BeamConfig | None = None, skip_bad: bool = False) -> EvalReport:
    """Decode `utts` (offline batches, or one streaming session per utterance) and score them.

    Audio that fails to decode raises AudioError, or with `skip_bad` leaves its utterance out of
    the scores and its message in the report's `skipped`."""
    t0 = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    if stream:
        from .audio import AudioError, load_audio
        from .live import run_file_stream

        hyps: list[str | None] = []
        for u in utts:
            try:
                wave = load_audio(u.path, lm.feature_config.sample_rate)
            except AudioError as e:
                if not skip_bad:
                    raise
                skipped.append((u.id, str(e)))
                hyps.append(None)
            else:
                hyps.append(run_file_stream(lm, wave, echo=False, beam=beam).text)
            if progress:
                progress(1)
    else:
        hyps = decode_utterances(lm, utts, progress=progress, beam=beam,
                                 skipped=skipped if skip_bad else None)
    elapsed = time.perf_counter() - t0
    kept = [(u, h) for u, h in zip(utts, hyps, strict=True) if h is not None]
    utts, hyps = [u for u, _ in kept], [h for _, h in kept]
    results = [UtteranceResult(u.id, u.text, h, utterance_errors(u.text, h), len(u.text.split()),
                               u.duration) for u, h in zip(utts, hyps, strict=True)]
    return EvalReport(error_counts([u.text for u in utts], hyps), results,
                      audio_seconds=sum(u.duration for u in utts), decode_seconds=elapsed,
                      skipped=[message for _, message in skipped])


def align_pair(ref: str, hyp: str) -> tuple[str, str]:
    """Two lines, ref and hyp, padded so aligned words sit above each other; errors upper-cased."""
    o = jiwer.process_words(normalize_text(ref) or " ", normalize_text(hyp) or " ")
    rw, hw = o.references[0], o.hypotheses[0]
    top, bottom = [], []
    for chunk in o.alignments[0]:
        if chunk.type == "equal":
            for a, b in zip(rw[chunk.ref_start_idx:chunk.ref_end_idx],
                            hw[chunk.hyp_start_idx:chunk.hyp_end_idx], strict=True):
                n = max(len(a), len(b))
                top.append(a.ljust(n))
                bottom.append(b.ljust(n))
        elif chunk.type == "substitute":
            for a, b in zip(rw[chunk.ref_start_idx:chunk.ref_end_idx],
                            hw[chunk.hyp_start_idx:chunk.hyp_end_idx], strict=True):
                n = max(len(a), len(b))
                top.append(a.upper().ljust(n))
                bottom.append(b.upper().ljust(n))
        elif chunk.type == "delete":
            for a in rw[chunk.ref_start_idx:chunk.ref_end_idx]:
                top.append(a.upper())
                bottom.append("*" * len(a))
        else:  # insert
            for b in hw[chunk.hyp_start_idx:chunk.hyp_end_idx]:
                top.append("*" * len(b))
                bottom.append(b.upper())
    return " ".join(top), " ".join(bottom)
