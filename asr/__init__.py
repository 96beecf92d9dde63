"""Streaming GRU-CTC speech recognition: library API.

    import asr
    lm = asr.load_model("models/bigru.pt")
    print(asr.transcribe(lm, "samples/9300-1-0088.flac").text)                      # greedy
    print(asr.transcribe(lm, "samples/9300-1-0088.flac", beam=asr.BeamConfig()).text)  # beam + LM
"""

from __future__ import annotations

import os

from .audio import SAMPLE_RATE, AudioError, load_audio
from .beam import BeamConfig
from .checkpoint import CheckpointError, LoadedModel, load_model
from .streaming import StreamEvent, StreamingSession
from .transcribe import Transcript, transcribe_file, transcribe_wave


def transcribe(lm: LoadedModel, audio: str | os.PathLike, beam: BeamConfig | None = None) -> Transcript:
    """Transcribe an audio file of any length with a loaded model (bounded memory): greedy decoding,
    or with `beam` (e.g. `BeamConfig()`, the shipped LM and the CLI's defaults) the beam search that
    `asr transcribe` uses by default (needs flashlight-text)."""
    return transcribe_file(lm, audio, beam=beam)


__all__ = ["SAMPLE_RATE", "AudioError", "BeamConfig", "CheckpointError", "LoadedModel", "StreamEvent",
           "StreamingSession", "Transcript", "load_audio", "load_model", "transcribe",
           "transcribe_file", "transcribe_wave"]
