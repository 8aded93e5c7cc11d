"""Writing a run's small files (config, summary, metrics log) so that a kill never leaves one torn."""

from __future__ import annotations

import os
import pathlib


def write_atomically(path: str | pathlib.Path, text: str) -> None:
    """Writes `text` to `path` so that a reader, or a run killed meanwhile, sees the old file or the new
    one, never a mix: a temporary file beside it, flushed to disk, then renamed over it."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
