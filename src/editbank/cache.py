"""The cache root editbank keeps built worlds (`worlds/`) and locate-method key statistics (`stats/`) under."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $EDITBANK_CACHE, else $XDG_CACHE_HOME/editbank, else ~/.cache/editbank."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("EDITBANK_CACHE"):
        return Path(os.environ["EDITBANK_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "editbank"
    return Path.home() / ".cache" / "editbank"
