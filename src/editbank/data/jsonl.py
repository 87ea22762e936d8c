"""editbank's own format: JSON Lines, one `EditRequest.to_dict()` object per line.

Fields: prompt, target (required strings), subject, rephrases [str], locality [[prompt, answer]] (or
{"prompt", "answer"} objects), portability (same), key, meta {...}; unknown fields are errors. Blank lines
are skipped; errors name the 1-based line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

from ..requests import EditRequest
from .base import DatasetError, Record, check_limit

_FIELD = re.compile(r"EditRequest\.(\w+)")
_NAMES = {f.name for f in dataclasses.fields(EditRequest)}


def parse_lines(lines: Iterable[str], source: str, limit: int | None = None) -> list[EditRequest]:
    """Parse JSONL text lines into requests, stopping after `limit` records."""
    out: list[EditRequest] = []
    for n, line in enumerate(lines, start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{source}: line {n}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        rec = Record(data, source, n, unit="line")
        unknown = sorted(set(data) - _NAMES)
        if unknown:
            raise rec.error(unknown[0], f"unknown field (EditRequest fields: {', '.join(sorted(_NAMES))})")
        try:
            out.append(EditRequest.from_dict(data))
        except (TypeError, ValueError) as exc:
            m = _FIELD.search(str(exc))
            raise rec.error(m.group(1) if m else None, str(exc)) from None
    return out


def read(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a JSONL file of EditRequest objects."""
    limit = check_limit(limit)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return parse_lines(f, str(path), limit)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def write(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as JSONL (the inverse of `read`)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
