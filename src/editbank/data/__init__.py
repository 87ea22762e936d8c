"""Dataset readers: published knowledge-editing sets (and our JSONL) -> lists of EditRequest."""

from __future__ import annotations

import json
from pathlib import Path

from ..requests import EditRequest
from . import counterfact, jsonl, mquake, wise, zsre
from .base import Converter, DatasetError, DatasetWarning, check_limit, convert_all, load_json_list

CONVERTERS: dict[str, Converter] = {
    "zsre": zsre.convert,
    "counterfact_rome": counterfact.convert_rome,
    "counterfact_easyedit": counterfact.convert_easyedit,
    "wise_hallucination": wise.convert_hallucination,
    "wise_temporal": wise.convert_temporal,
    "mquake": mquake.convert,
}
FORMATS = ("zsre", "counterfact", *list(CONVERTERS)[1:], "jsonl")

__all__ = ["FORMATS", "DatasetError", "DatasetWarning", "detect_format", "load_requests"]


def detect_format(first: object) -> str | None:
    """The format a JSON-list file's first record looks like (by its keys), or None."""
    if not isinstance(first, dict):
        return None
    keys = set(first)
    if "requested_rewrite" in keys:
        return "mquake" if isinstance(first["requested_rewrite"], list) else "counterfact_rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        if "ood_rephrase" in keys:
            return "wise_temporal"
        if keys & {"ground_truth", "rephrase_prompt"}:
            return "counterfact_easyedit"
        if "locality_prompt" in keys:
            return "wise_hallucination"
    return None


def _is_jsonl(path: Path) -> bool:
    """JSONL when so named, or when the first non-blank line is a JSON object on its own."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                if not line.lstrip().startswith("{"):
                    return False
                try:
                    return isinstance(json.loads(line), dict)
                except ValueError:
                    return False
    return False


def load_requests(path: str | Path, format: str | None = None, limit: int | None = None) -> list[EditRequest]:
    """Read a dataset file into EditRequests; `format` is one of FORMATS, or None to detect it.

    `limit` reads only the first N records (for MQuAKE a record is a case of one or more edits). A malformed
    file raises DatasetError naming the file, the record and the field.
    """
    limit = check_limit(limit)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of: {', '.join(FORMATS)}")
    path = Path(path)
    if format == "jsonl" or (format is None and _is_jsonl(path)):
        return jsonl.read(path, limit)
    source, records = load_json_list(path)
    if not records:
        return []
    if format in (None, "counterfact"):
        found = detect_format(records[0])
        if found is None or (format == "counterfact" and not found.startswith("counterfact")):
            keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
            want = "a CounterFact format" if format else "the format"
            raise DatasetError(f"{source}: record 0: cannot tell {want} from its keys {keys}; "
                               f"pass format= one of: {', '.join(FORMATS)}")
        format = found
    return convert_all(source, records, CONVERTERS[format], limit)
