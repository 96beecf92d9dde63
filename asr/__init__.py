"""Streaming GRU-CTC speech recognition: library API.

    import asr
    lm = asr.load_model("models/bigru.pt")
    print(asr.transcribe(lm, "samples/9300-1-0088.flac").text)
"""

from __future__ import annotations

import os

from .audio import SAMPLE_RATE, AudioError, load_audio
from .checkpoint import CheckpointError, LoadedModel, load_model
from .streaming import StreamEvent, StreamingSession
from .transcribe import Transcript, transcribe_file, transcribe_wave


def transcribe(lm: LoadedModel, audio: str | os.PathLike) -> Transcript:
    """Transcribe an audio file of any length with a loaded model (bounded memory)."""
    return transcribe_file(lm, audio)


__all__ = ["SAMPLE_RATE", "AudioError", "CheckpointError", "LoadedModel", "StreamEvent",
           "StreamingSession", "Transcript", "load_audio", "load_model", "transcribe",
           "transcribe_file", "transcribe_wave"]
