"""Where built worlds live on disk, and the atomic publish of a finished build."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..cache import cache_root

#: Written last into a build directory; its presence means the world is complete.
MARKER = "world.complete"


def world_dir(name: str, spec_hash: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the world `name` with spec hash `spec_hash`."""
    return cache_root(cache_dir) / "worlds" / f"{name}-{spec_hash}"


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished build (the marker is written last)."""
    return (path / MARKER).is_file()


def sweep_stale_builds(parent: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove temporary build directories that crashed builds left behind long ago."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in parent.glob(".*.tmp-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def publish(tmp: Path, final: Path, force: bool) -> None:
    """Move the finished build `tmp` to `final` atomically; keep a complete `final` unless `force`."""
    if final.exists() and (force or not is_complete(final)):
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final):  # lost a race against a concurrent build only if that one finished
            raise
        shutil.rmtree(tmp, ignore_errors=True)
