"""The one check made before opening any input file (audio, model, language model)."""

from __future__ import annotations

import os
from pathlib import Path


def readable_file(path: str | os.PathLike, kind: str, error: type[Exception]) -> Path:
    """`path` as a Path, or `error` with a one-line message naming the file and the problem:
    missing, a directory, not readable, or empty. `kind` names the file in messages ("audio
    file", "model file")."""
    p = Path(path)
    if not p.exists():
        raise error(f"{p}: no such {kind}")
    if p.is_dir():
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise error(f"{p}: is a directory, not {article} {kind}")
    if not os.access(p, os.R_OK):
        raise error(f"{p}: permission denied")
    if p.stat().st_size == 0:
        raise error(f"{p}: {kind} is empty")
    return p
