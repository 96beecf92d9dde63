"""Microphone faults that need no sound server: a capture device that reports input overflows on
every block. PortAudio is replaced by a stand-in `sounddevice` module (first on PYTHONPATH) that
plays a real recording through the same callback interface; everything after it is the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import jiwer
import pytest
import soundfile as sf
from conftest import ROOT, SAMPLES, sample_reference

from asr.live import OVERFLOW_WARN_S

pytestmark = pytest.mark.slow

LEAD_S = 3.0  # silence before the speech, as in tests/test_mic.py

FAKE_SOUNDDEVICE = '''
import os, threading, time
import numpy as np, soundfile as sf

class PortAudioError(Exception):
    pass

class _Default:
    device = (0, 0)

default = _Default()

def query_devices():
    return [{"name": "overflowing test device", "max_input_channels": 1,
             "default_samplerate": 16000.0, "hostapi": 0}]

def query_hostapis():
    return [{"name": "test"}]

def check_input_settings(**kwargs):
    pass

class _Status:
    input_overflow = True  # every block: the machine never keeps up

class InputStream:
    def __init__(self, device, channels, samplerate, dtype, blocksize, callback):
        wave, sr = sf.read(os.environ["FAKE_MIC_AUDIO"], dtype="float32")
        assert sr == samplerate == 16000
        lead = np.zeros(int(float(os.environ["FAKE_MIC_LEAD_S"]) * sr), np.float32)
        self.wave = np.concatenate([lead, wave, np.zeros(30 * sr, np.float32)])
        self.blocksize, self.callback, self.active = blocksize, callback, False

    def start(self):
        self.active = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        for i in range(0, len(self.wave) - self.blocksize + 1, self.blocksize):
            if not self.active:
                return
            self.callback(self.wave[i:i + self.blocksize, None], self.blocksize, None, _Status())
            time.sleep(0.001)

    def stop(self):
        self.active = False

    def close(self):
        pass
'''


def test_sustained_input_overflows_warn_and_never_stop_listening(paused_stream_model, tmp_path):
    stem = "9300-1-0088"
    audio = SAMPLES / f"{stem}.flac"
    (tmp_path / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    max_seconds = LEAD_S + sf.info(str(audio)).duration + 3.0
    env = {**os.environ, "FAKE_MIC_AUDIO": str(audio), "FAKE_MIC_LEAD_S": str(LEAD_S),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cli", "listen", "--model", str(paused_stream_model),
                        "--max-seconds", f"{max_seconds:.2f}", "--format", "jsonl"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: input overflow")]
    # said, but not once per block (~100 blocks): at most once per OVERFLOW_WARN_S of wall time,
    # however slowly a loaded machine ran it
    assert 1 <= len(warnings) <= 1 + elapsed // OVERFLOW_WARN_S, r.stderr
    assert "--chunk-ms" in warnings[0]
    summary = re.search(r"(\d+) input overflows", r.stderr)
    assert summary and int(summary.group(1)) >= int(max_seconds * 10), r.stderr  # all counted
    finals = [e for e in map(json.loads, r.stdout.splitlines()) if e["type"] == "final"]
    heard = " ".join(e["text"] for e in finals)
    assert jiwer.cer(sample_reference(stem).lower(), heard) < 0.1, heard  # recognised and printed


class _DiskFullAfter:
    """Stands in for the open soundfile.SoundFile: the first `n` writes succeed, then the disk is
    full (libsndfile reports that as a RuntimeError)."""

    def __init__(self, real, n: int):
        self.real, self.n = real, n

    def write(self, data):
        if self.n == 0:
            raise RuntimeError("Error : System error : No space left on device")
        self.n -= 1
        self.real.write(data)

    @property
    def closed(self):
        return self.real.closed

    def close(self):
        self.real.close()


def test_save_audio_write_failure_is_one_error_and_keeps_the_previous_file(tmp_path):
    import numpy as np

    from asr.live import WavRecorder

    path = tmp_path / "talk.wav"
    path.write_bytes(b"an earlier recording")
    rec = WavRecorder(path, 16000)
    rec._file = _DiskFullAfter(rec._file, 2)
    blocks = (np.full(1600, 0.1, np.float32) for _ in range(10))
    passed = []
    with pytest.raises(OSError, match=r"cannot write .*talk\.wav: .*No space left on device"):
        for block in rec.tee(blocks):
            passed.append(block)
    rec.close()
    assert len(passed) == 2  # what was recorded before the failure was still recognised
    assert path.read_bytes() == b"an earlier recording"  # not replaced by a truncated file
    assert [p.name for p in tmp_path.iterdir()] == ["talk.wav"]  # no temporary file left


def test_save_audio_replaces_the_file_when_complete(tmp_path):
    import numpy as np

    from asr.live import WavRecorder

    path = tmp_path / "talk.wav"
    path.write_bytes(b"an earlier recording")
    rec = WavRecorder(path, 16000)
    assert len(list(rec.tee(np.full(1600, 0.1, np.float32) for _ in range(10)))) == 10
    rec.close()
    info = sf.info(str(path))
    assert info.frames == 16000 and info.subtype == "PCM_16"
    assert [p.name for p in tmp_path.iterdir()] == ["talk.wav"]


def test_input_device_is_found_by_id_name_or_part_of_a_name(monkeypatch):
    """`--input-device`: an ID, an exact name (even when it is part of another's), or a part of
    one name; several partial matches and no match are one-line errors naming the fix."""
    import asr.mic
    from asr.mic import InputDevice, MicrophoneError, resolve_device

    devices = [InputDevice(0, "HDA Intel PCH: ALC3246 Analog", 2, 44100, "ALSA", False),
               InputDevice(3, "USB Audio", 1, 48000, "ALSA", False),
               InputDevice(4, "USB Audio Device 2", 1, 48000, "ALSA", False),
               InputDevice(7, "pulse", 32, 44100, "ALSA", True)]
    monkeypatch.setattr(asr.mic, "list_devices", lambda: devices)
    assert resolve_device(None).index == 7 and resolve_device("").index == 7
    assert resolve_device(3).index == 3 and resolve_device("4").index == 4
    assert resolve_device("alc3246").index == 0  # part of a name, any case
    assert resolve_device("usb audio").index == 3  # the exact name wins over a longer one
    for spec, message in (("usb", "'usb' matches several input devices (3 'USB Audio', 4 'USB Audio "
                                  "Device 2'); give the ID"),
                          ("9", "no input device with ID 9"), ("webcam", "no input device matches "
                                                                         "'webcam'")):
        with pytest.raises(MicrophoneError) as e:
            resolve_device(spec)
        assert str(e.value).startswith(message) and "asr listen --list-devices" in str(e.value)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(asr.mic, "list_devices", lambda: [d for d in devices if not d.is_default])
    with pytest.raises(MicrophoneError, match="no default input device; pick one with --input-device"):
        resolve_device(None)
    monkeypatch.setattr(asr.mic, "list_devices", lambda: [])
    with pytest.raises(MicrophoneError, match="no audio input device found"):
        resolve_device("usb")
