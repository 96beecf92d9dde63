"""CTC beam search with a word n-gram language model (flashlight-text's lexicon decoder + KenLM).

The search is lexicon-constrained: every word it outputs is a word of the language model's
vocabulary, spelled with the acoustic model's characters and followed by a space, and each word
is scored by the n-gram LM (log10 probabilities times `lm_weight`, plus `word_score`).

`BeamCTCStream` is the one decoder for files and for live audio: `push()` log-probability chunks
as they arrive, read `partial()` (the best path so far) at any time, and `finish()` an utterance.
Pushing the same frames in any chunking gives exactly the same search, so a streamed utterance's
final text equals the offline result on the same audio. Word timings and confidences come from
the best hypothesis' frame-level path, with the same meaning as the greedy decoder's: a word spans
its characters' runs of frames, and its confidence is the mean per-character posterior.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from .decoding import Emission, Endpointer
from .lm import BOS, EOS, UNK, LMError, arpa_vocabulary
from .text import Vocab

DEFAULT_LM = Path(__file__).resolve().parent.parent / "models" / "lm.arpa.gz"
MAX_BEAM = 10_000  # largest beam_size / beam_size_token accepted (the decoder's sizes are C ints)
END_FRAME_LOGP = -1e4  # log-probability of every token but space in the frame that closes a word


@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings; the defaults are the ones tuned on the dev splits."""

    lm_path: str = str(DEFAULT_LM)  # word n-gram LM, ARPA text (plain or .gz)
    beam_size: int = 128  # hypotheses kept after each frame
    beam_size_token: int = 12  # most likely tokens tried per frame
    beam_threshold: float = 20.0  # drop hypotheses this far (natural log) below the best
    lm_weight: float = 1.3  # weight of the LM's log10 probabilities (swept: models/README.md)
    word_score: float = 0.0  # added per word (positive favours more, shorter words)
    sil_score: float = 0.0  # added per frame of space

    def __post_init__(self):
        for name in ("beam_size", "beam_size_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BEAM:
                raise ValueError(f"{name} must be a whole number from 1 to {MAX_BEAM}, not {value!r}")
        for name in ("beam_threshold", "lm_weight", "word_score", "sil_score"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, not {getattr(self, name)!r}")
        if self.lm_weight < 0:
            raise ValueError(f"lm_weight must be at least 0, not {self.lm_weight!r}")
        if self.beam_threshold <= 0:
            raise ValueError(f"beam_threshold must be above 0, not {self.beam_threshold!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _quiet_stderr():
    """Silence C++ writes to fd 2 (KenLM prints a loading progress bar there)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class _Lexicon:
    """What every decoder on one LM shares: KenLM, word dictionary and the spelling trie."""

    lm: object
    trie: object
    words: list[str]
    unk_index: int


@functools.lru_cache(maxsize=4)
def load_lexicon(lm_path: str, chars: str) -> _Lexicon:
    """KenLM model and spelling trie for a vocabulary of characters (cached per path and chars).

    Raises LMError when the LM file is missing or unreadable, or no word is spellable."""
    from flashlight.lib.text.decoder import SmearingMode, Trie
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    vocab = Vocab(chars)
    path = Path(lm_path)
    letters = set(chars) - {" "}
    words = [w for w in dict.fromkeys(arpa_vocabulary(path))
             if w not in (BOS, EOS, UNK) and set(w) <= letters]
    if not words:
        raise LMError(f"{path}: no word of the LM can be spelled with the model's characters")
    word_dict = Dictionary()
    for w in words:
        word_dict.add_entry(w)
    word_dict.add_entry(UNK)
    unk_index = word_dict.get_index(UNK)
    try:
        with _quiet_stderr():
            lm = KenLM(str(path), word_dict)
    except Exception as e:  # KenLM raises plain RuntimeErrors for malformed files
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if len(lines) > 1 and " threw " in lines[0]:  # "file.cc:N in <signature> threw X." then the reason
            lines = lines[1:]
        reason = " ".join(lines) or type(e).__name__
        raise LMError(f"{path}: KenLM cannot read this language model ({reason})") from None
    space = vocab.space_id
    trie = Trie(len(vocab), space)
    start = lm.start(False)
    for i, w in enumerate(words):
        _, score = lm.score(start, i)
        trie.insert([*vocab.encode(w), space], i, score)
    trie.smear(SmearingMode.MAX)
    return _Lexicon(lm, trie, words, unk_index)


def path_emissions(path: list[int], log_probs: np.ndarray, offset: int = 0,
                   blank: int = 0) -> list[Emission]:
    """CTC collapse of a frame-level token path into emissions with their log-probabilities.

    Args:
        path: best token per frame, length T'.
        log_probs: (T', V) the frames' log-probabilities.
        offset: absolute frame number of path[0].
    """
    out: list[Emission] = []
    prev = blank
    for t, tok in enumerate(path):
        if tok != blank:
            lp = float(log_probs[t, tok])
            if tok == prev and out:
                out[-1].end = offset + t + 1
                out[-1].logp_sum += lp
            else:
                out.append(Emission(tok, offset + t, offset + t + 1, lp))
        prev = tok
    return out


@dataclass
class BeamCTCStream:
    """Incremental beam search over consecutive log-probability chunks of one stream.

    Frames are decoded lazily: `push()` only queues them; `partial()` and `finish()` run the search
    over what is queued. Emission frame numbers count from the start of the stream, across utterances.
    """

    vocab: Vocab
    config: BeamConfig = field(default_factory=BeamConfig)
    n_frames: int = 0  # output frames pushed so far (stream clock)

    def __post_init__(self):
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconDecoder,
            LexiconDecoderOptions,
        )

        cfg = self.config
        self._lex = load_lexicon(str(cfg.lm_path), self.vocab.chars)
        opts = LexiconDecoderOptions(
            beam_size=cfg.beam_size, beam_size_token=min(cfg.beam_size_token, len(self.vocab)),
            beam_threshold=cfg.beam_threshold, lm_weight=cfg.lm_weight,
            word_score=cfg.word_score, unk_score=float("-inf"), sil_score=cfg.sil_score,
            log_add=False, criterion_type=CriterionType.CTC)
        self._decoder = LexiconDecoder(opts, self._lex.trie, self._lex.lm, self.vocab.space_id,
                                       self.vocab.blank_id, self._lex.unk_index, [], False)
        self._begin(self.n_frames)

    def _begin(self, start_frame: int) -> None:
        self._decoder.decode_begin()
        self._start = start_frame  # stream frame of the current utterance's first frame
        self._frames: list[np.ndarray] = []  # (T_i, V) chunks of this utterance
        self._decoded = 0  # frames of this utterance already searched
        self._pending: list[np.ndarray] = []

    def push(self, log_probs: Tensor) -> None:
        """Queue (T', V) log-probabilities of the next frames."""
        assert log_probs.ndim == 2 and log_probs.shape[1] == len(self.vocab), tuple(log_probs.shape)
        if log_probs.shape[0] == 0:
            return
        x = np.ascontiguousarray(log_probs.detach().float().cpu().numpy(), dtype=np.float32)
        self._pending.append(x)
        self._frames.append(x)
        self.n_frames += x.shape[0]

    def _step(self, x: np.ndarray) -> None:
        self._decoder.decode_step(x.ctypes.data, x.shape[0], x.shape[1])

    def _run_pending(self) -> None:
        for x in self._pending:
            self._step(x)
            self._decoded += x.shape[0]
        self._pending = []

    def _emissions(self, tokens: list[int]) -> list[Emission]:
        n = self._decoded
        if n == 0:
            return []
        lp = np.concatenate(self._frames, axis=0)
        path = list(tokens[1:n + 1])  # tokens[0] is the start state, before any frame
        return path_emissions(path, lp, self._start, self.vocab.blank_id)

    def partial(self) -> list[Emission]:
        """Best path of the current utterance so far (its last word may be incomplete)."""
        self._run_pending()
        if self._decoded == 0:
            return []
        # flashlight's get_best_hypothesis() stops at the last completed word; the live hypotheses
        # of the last frame (unsorted before the end) also carry the word being spelled
        hyps = self._decoder.get_all_final_hypothesis()
        if not hyps:
            return []
        return self._emissions(max(hyps, key=lambda h: h.score).tokens)

    def finish(self) -> list[Emission]:
        """Close the utterance: finish its last word, add the end-of-sentence LM score and
        return the best path; the next frames start a new utterance."""
        self._run_pending()
        emissions: list[Emission] = []
        if self._decoded:
            end = np.full((1, len(self.vocab)), END_FRAME_LOGP, dtype=np.float32)
            end[0, self.vocab.space_id] = 0.0  # a certain space closes a word left open
            self._step(end)
            self._decoder.decode_end()
            hyps = self._decoder.get_all_final_hypothesis()
            if hyps:
                emissions = self._emissions(hyps[0].tokens)
        self._begin(self.n_frames)
        return emissions

    def reset(self) -> None:
        """A new stream: the clock back to 0, nothing queued."""
        self.n_frames = 0
        self._begin(0)


class EndpointedBeam:
    """Beam search over a long recording cut into utterances at pauses, by the same rule as
    `StreamingSession`: an utterance with a letter closes after `endpoint_frames` output frames whose
    best token is blank or space; trailing frames without a letter are dropped at the end. Memory
    stays bounded by one utterance, and the result equals the streaming session's final events.
    """

    def __init__(self, vocab: Vocab, config: BeamConfig | None = None,
                 endpoint_frames: int | None = None):
        self.beam = BeamCTCStream(vocab, config or BeamConfig())
        self.endpointer = Endpointer(vocab, endpoint_frames)

    def push(self, log_probs: Tensor) -> list[list[Emission]]:
        """Consume (T', V) log-probabilities; returns the emissions of each utterance closed."""
        closed, seg = [], 0
        for end in self.endpointer.cuts(log_probs):
            self.beam.push(log_probs[seg:end])
            seg = end
            closed.append(self.beam.finish())
        self.beam.push(log_probs[seg:])
        return closed

    def flush(self) -> list[list[Emission]]:
        """End of input: the last utterance, if it has a letter."""
        if not self.endpointer.has_speech:
            return []
        self.endpointer.reset()
        return [self.beam.finish()]


def beam_decode(log_probs: Tensor, vocab: Vocab, config: BeamConfig | None = None) -> list[Emission]:
    """Beam search over one utterance: (T', V) log-probabilities -> emissions of the best path."""
    dec = BeamCTCStream(vocab, config or BeamConfig())
    dec.push(log_probs)
    return dec.finish()


def beam_decode_batch(log_probs: Tensor, lengths: Tensor, vocab: Vocab,
                      config: BeamConfig | None = None) -> list[list[Emission]]:
    """(B, T', V), (B,) -> emissions per utterance, one search each."""
    dec = BeamCTCStream(vocab, config or BeamConfig())
    out = []
    for b, n in enumerate(lengths.tolist()):
        dec.push(log_probs[b, :n])
        out.append(dec.finish())
        dec.reset()
    return out


def emissions_text(emissions: list[Emission], vocab: Vocab) -> str:
    return " ".join("".join(vocab.tokens[e.token] for e in emissions).split())


__all__ = ["DEFAULT_LM", "BeamCTCStream", "BeamConfig", "beam_decode", "beam_decode_batch",
           "emissions_text", "load_lexicon", "path_emissions"]
