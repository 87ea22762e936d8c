"""ZsRE in the MEND format: `subject, src, pred, rephrase, alt, answers, loc, loc_ans` (+ optional `portability`)."""

from __future__ import annotations

from pathlib import Path

from ..requests import EditRequest
from .base import Record, build, portability, read_with, usable

FIELDS = {"prompt": "src", "target": "alt", "subject": "subject", "rephrases": "rephrase", "locality": "loc",
          "portability": "portability"}
_USED = {"src", "alt", "subject", "rephrase", "loc", "loc_ans", "portability"}


def convert(rec: Record) -> list[EditRequest]:
    """One record -> one request: src -> alt; the "nq question: ..." loc/loc_ans pair is a locality probe.

    meta keeps `answers`, `pred`, `cond` and any other field; meta["true_object"] is answers[0] when given.
    """
    meta = rec.rest(_USED)
    answers = rec.texts("answers", required=False)
    if answers:
        meta["true_object"] = answers[0]
    locality = []
    if rec.has("loc") or rec.has("loc_ans"):
        locality = usable([(rec.text("loc"), rec.text("loc_ans"))], "locality", meta)
    return [build(rec, FIELDS, prompt=rec.text("src"), target=rec.text("alt"),
                  subject=rec.text("subject") if rec.has("subject") else None,
                  rephrases=[r for r in rec.texts("rephrase", required=False) if r.strip()],
                  locality=locality, portability=usable(portability(rec), "portability", meta),
                  meta={**meta, "format": "zsre", "record": rec.index})]


def read(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a ZsRE (MEND format) JSON list file."""
    return read_with(convert, path, limit)
