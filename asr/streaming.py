"""Live decoding: a session that turns audio chunks into partial and final text events.

`StreamingSession` is the only object here that holds mutable streaming state: the resampler, the
featurizer's sample tail, the model's `StreamState`, and the greedy decoder's last token and the
emissions of the current utterance. With the hidden state kept across endpoints (the default), the
final texts of a session fed any chunking of a file are the offline transcript of that file, with
the same word timings.

Cost per pushed chunk is bounded by the chunk and the current utterance, never by the stream: the
decoder's emissions are dropped at each endpoint, and partial events carry only text (no words), built
incrementally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .beam import BeamConfig, BeamCTCStream, emissions_text
from .checkpoint import LoadedModel
from .decoding import WORD_BREAK_S, Emission, Endpointer, GreedyCTCStream, Word, emissions_to_words
from .features import OnlineLogMel


@dataclass
class StreamEvent:
    kind: str  # "partial" (utterance so far) or "final" (utterance closed)
    text: str
    start: float  # seconds from the start of the stream
    end: float
    utterance: int  # 0-based utterance number in this stream
    words: list[Word] = field(default_factory=list)  # finals only; partials leave it empty

    def to_dict(self) -> dict:
        return {"type": self.kind, "utterance": self.utterance, "text": self.text,
                "start": round(self.start, 3), "end": round(self.end, 3),
                "words": [w.to_dict() for w in self.words]}


class StreamingSession:
    """Feed audio with push(); read StreamEvents; flush() at the end; reset() for a new stream.

    Args:
        lm: a unidirectional (causal) model.
        sample_rate: rate of the pushed samples; other rates than the model's are resampled
            with a streaming (stateful) resampler.
        endpoint_ms: close an utterance after this much trailing non-speech (output frames whose
            best token is blank or space) once it has text; None disables endpointing (only
            flush() closes an utterance).
        reset_on_endpoint: also reset the model's hidden state at each endpoint. Off by default:
            keeping it was measured to give fewer errors (see the README's streaming section).
        restart_mean_on_endpoint: for streams whose speaker may change at a pause: at each
            endpoint the front end's running mean (models trained with one) starts afresh instead
            of carrying the last speaker's into the next utterance. Off by default (measured in the
            README's streaming section); with it on, a stream's text no longer equals offline
            decoding of the whole stream.
        beam: decode with a beam search and a word LM instead of greedily: partial texts are the
            search's best path so far, and each final text equals the offline beam result on the
            utterance (greedy best tokens still decide the endpoints).
        partials: emit partial events; without them (a consumer of final text only) the beam
            search skips its best-path readout after every chunk.
    """

    def __init__(self, lm: LoadedModel, sample_rate: int | None = None,
                 endpoint_ms: float | None = 800.0, reset_on_endpoint: bool = False,
                 beam: BeamConfig | None = None, partials: bool = True,
                 restart_mean_on_endpoint: bool = False):
        if lm.model.cfg.bidirectional:
            raise ValueError(f"{lm.path or 'model'}: a bidirectional model cannot stream; "
                             f"use a unidirectional model such as models/gru-stream.pt")
        if endpoint_ms is not None and endpoint_ms <= 0:
            raise ValueError(f"endpoint_ms must be positive or None, got {endpoint_ms}")
        self.lm = lm
        self.model_rate = lm.feature_config.sample_rate
        self.sample_rate = int(sample_rate or self.model_rate)
        self.endpoint_ms = endpoint_ms
        self.reset_on_endpoint = reset_on_endpoint
        self.restart_mean_on_endpoint = restart_mean_on_endpoint
        self.beam_config = beam
        self.frame_s = lm.frame_seconds
        # output frames of non-speech that close an utterance
        self._endpoint_frames = (None if endpoint_ms is None
                                 else max(1, round(endpoint_ms / 1000 / self.frame_s)))
        self._break_frames = WORD_BREAK_S / self.frame_s
        self.partials = partials
        self.reset()

    def reset(self) -> None:
        """Back to the state before any audio."""
        self.featurizer = OnlineLogMel(self.lm.feature_config, self.lm.stats)
        self.state = self.lm.model.init_state(device=self.lm.device)
        self.decoder = GreedyCTCStream(blank=self.lm.vocab.blank_id)
        self.beam = None if self.beam_config is None else BeamCTCStream(self.lm.vocab, self.beam_config)
        self.utterance = 0
        self.n_samples = 0  # samples pushed, at the model's rate
        self._resampler = None
        if self.sample_rate != self.model_rate:
            import soxr

            self._resampler = soxr.ResampleStream(self.sample_rate, self.model_rate, 1,
                                                  dtype="float32")
        self.endpointer = Endpointer(self.lm.vocab, self._endpoint_frames)
        self._raw = ""  # characters emitted in the current utterance (spaces uncollapsed)
        self._last_emission: Emission | None = None  # of the current utterance
        self._last_partial = ""

    @property
    def seconds(self) -> float:
        """Audio time pushed so far."""
        return self.n_samples / self.model_rate

    def _decode(self, log_probs: torch.Tensor) -> None:
        """Feed (T', V) log-probs to the decoder and extend the utterance's raw text."""
        if log_probs.shape[0]:
            tokens = self.lm.vocab.tokens
            for e in self.decoder.push(log_probs):
                last = self._last_emission
                if last is not None and e.start - last.end >= self._break_frames:
                    self._raw += " "  # a long pause separates words, as in emissions_to_words
                self._raw += tokens[e.token]
                self._last_emission = e
            if self.beam is not None:
                self.beam.push(log_probs)

    def _run(self, feats: torch.Tensor) -> list[StreamEvent]:
        if feats.shape[0] == 0:
            return []
        with torch.inference_mode():
            lp, self.state = self.lm.model.step(feats[None].to(self.lm.device), self.state)
        lp = lp[0]  # (T', V)
        events: list[StreamEvent] = []
        seg = 0  # first frame not yet given to the decoder
        for end in self.endpointer.cuts(lp):
            self._decode(lp[seg:end])
            seg = end
            events.append(self._final())
        self._decode(lp[seg:])
        if self.partials and self.endpointer.has_speech:
            if self.beam is None:
                em, text = self.decoder.emissions, " ".join(self._raw.split())
            else:
                em = self.beam.partial()
                text = emissions_text(em, self.lm.vocab)
            if em and text != self._last_partial:
                events.append(StreamEvent("partial", text, em[0].start * self.frame_s,
                                          em[-1].end * self.frame_s, self.utterance))
                self._last_partial = text
        return events

    def _final(self) -> StreamEvent:
        em = self.decoder.emissions if self.beam is None else self.beam.finish()
        words = emissions_to_words(em, self.lm.vocab, self.frame_s, max_end_s=self.seconds)
        now = self.decoder.n_frames * self.frame_s
        ev = StreamEvent("final", " ".join(w.word for w in words),
                         words[0].start if words else now, words[-1].end if words else now,
                         self.utterance, words)
        self.utterance += 1
        self.decoder.emissions = []  # the decoder keeps its frame count and last token
        self._raw = ""
        self._last_emission = None
        self._last_partial = ""
        if self.reset_on_endpoint:
            self.state = self.lm.model.init_state(device=self.lm.device)
        if self.restart_mean_on_endpoint:
            self.featurizer.restart_mean()
        return ev

    def push(self, samples: np.ndarray) -> list[StreamEvent]:
        """Add audio (mono float32 at `sample_rate`, any length); returns the events it caused."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=False)
        self.n_samples += len(x)
        return self._run(self.featurizer.accept(x))

    def flush(self) -> list[StreamEvent]:
        """End of stream: decode the remaining audio and close the current utterance.

        Returns only final events. Use reset() before feeding a new stream.
        """
        events = []
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.n_samples += len(tail)
            events += self._run(self.featurizer.accept(tail))
        events += self._run(self.featurizer.finish())
        if self.endpointer.has_speech:
            events.append(self._final())
            self.endpointer.has_speech = False
        return [e for e in events if e.kind == "final"]
