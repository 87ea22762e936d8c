"""WISE's hallucination (SelfCheckGPT) and temporal (TemporalWiki) sets: `prompt, target_new, subject,
locality_prompt, locality_ground_truth` (+ `ood_rephrase` in temporal)."""

from __future__ import annotations

from pathlib import Path

from ..requests import EditRequest
from .base import Record, build, pairs, portability, read_with, usable

FIELDS = {"prompt": "prompt", "target": "target_new", "subject": "subject", "rephrases": "ood_rephrase",
          "locality": "locality_prompt", "portability": "portability"}
_USED = {"prompt", "target_new", "subject", "ood_rephrase", "locality_prompt", "locality_ground_truth",
         "portability"}


def _convert(rec: Record, fmt: str, ood_required: bool) -> list[EditRequest]:
    meta = rec.rest(_USED)
    ood = rec.texts("ood_rephrase", required=ood_required)
    if ood:
        meta["rephrases_ood"] = True
    locality = pairs(rec, "locality_prompt", "locality_ground_truth") if rec.has("locality_prompt") else []
    return [build(rec, FIELDS, prompt=rec.text("prompt"), target=rec.text("target_new"),
                  subject=rec.text("subject") if rec.has("subject") else None,
                  rephrases=[r for r in ood if r.strip()], locality=usable(locality, "locality", meta),
                  portability=usable(portability(rec), "portability", meta),
                  meta={**meta, "format": fmt, "record": rec.index})]


def convert_hallucination(rec: Record) -> list[EditRequest]:
    """One record -> one request (prompt -> target_new, one locality probe); `ood_rephrase` is optional here.

    A locality probe with a blank answer (a few published records) is kept in meta["unusable_locality"].
    """
    return _convert(rec, "wise_hallucination", ood_required=False)


def convert_temporal(rec: Record) -> list[EditRequest]:
    """Like hallucination, but `ood_rephrase` is required. It becomes `rephrases` (meta["rephrases_ood"] =
    True) because WISE's own runner scores generalisation on it with target_new; note it is a whole
    out-of-distribution passage about the subject, not a rewording of the prompt."""
    return _convert(rec, "wise_temporal", ood_required=True)


def read_hallucination(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a WISE hallucination file (hallucination-edit.json / -train.json)."""
    return read_with(convert_hallucination, path, limit)


def read_temporal(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a WISE temporal file (temporal-edit.json / -train.json)."""
    return read_with(convert_temporal, path, limit)
