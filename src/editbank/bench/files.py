"""Append-only JSONL files that survive a kill: a torn last line is dropped on reading.

Several processes may share one run directory (the shards of a sharded bench): every append and every read holds an
exclusive lock on the file, so a reader never takes another writer's half-written line for a torn one.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines and fsync, so an acknowledged row is on disk."""
    if not rows:
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            _cut_torn_tail(f)  # a writer killed mid-line must not glue its half line to this one
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cut_torn_tail(f) -> None:
    """Truncate an open file back to its last newline (a torn final line)."""
    size = f.seek(0, os.SEEK_END)
    if not size:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    raw = f.read()
    f.truncate(raw.rfind(b"\n") + 1)
    f.seek(0, os.SEEK_END)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a JSONL file; a torn final line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            return _read_locked(f)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_locked(f) -> list[dict[str, Any]]:
    raw = f.read()
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(raw):
        f.truncate(good)
    return rows


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # shards may write the same file at once
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
