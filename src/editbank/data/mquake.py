"""MQuAKE (CF / T, incl. AKEW's copy): cases of several `requested_rewrite` edits plus multi-hop `questions`
whose answer after all the case's edits is `new_answer` (before: `answer`)."""

from __future__ import annotations

from pathlib import Path

from ..requests import EditRequest
from .base import Record, build, read_with, usable

_RR_USED = {"prompt", "subject", "target_new", "target_true", "question"}


def convert(rec: Record) -> list[EditRequest]:
    """One case -> one request per requested_rewrite, in order.

    Each request: the '{}' prompt filled with the subject -> target_new.str; its single-hop `question` is a
    rephrase; meta has true_object (target_true.str), case_id (the file's, else the record index), case_edit
    (position) and case_edits (count) so a benchmark can group a case. The multi-hop `questions`, answered
    with `new_answer`, are portability probes of the case's LAST request (they hold only once every edit of
    the case is in); that request's meta["case"] keeps the case's other fields (answer, aliases, hops, orig).
    """
    rewrites = rec.objs("requested_rewrite")
    case_id = rec.get("case_id", rec.index)
    questions = rec.texts("questions", required=False)
    multi_hop = [(q, rec.text("new_answer")) for q in questions]
    out = []
    for j, rr in enumerate(rewrites):
        field = f"requested_rewrite[{j}]."
        subject = rr.text("subject")
        new, true = rr.obj("target_new"), rr.obj("target_true")
        meta = {**rr.rest(_RR_USED), **{f"target_new_{k}": v for k, v in new.rest({"str"}).items()},
                **{f"target_true_{k}": v for k, v in true.rest({"str"}).items()}}
        last = j == len(rewrites) - 1
        if last:
            meta["case"] = rec.rest({"case_id", "requested_rewrite", "questions"})
        fields = {"prompt": field + "prompt", "target": field + "target_new.str", "subject": field + "subject",
                  "rephrases": field + "question", "portability": "questions"}
        out.append(build(
            rec, fields, prompt=rr.fill("prompt", subject), target=new.text("str"), subject=subject,
            rephrases=[q for q in rr.texts("question", required=False) if q.strip()],
            portability=usable(multi_hop, "portability", meta) if last else [],
            meta={**meta, "true_object": true.text("str"), "case_id": case_id, "case_edit": j,
                  "case_edits": len(rewrites), "format": "mquake", "record": rec.index}))
    return out


def read(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read an MQuAKE JSON list file; `limit` counts cases (records), each giving one or more requests."""
    return read_with(convert, path, limit)
