"""CounterFact in its two published shapes: the ROME format (`requested_rewrite` + prompt lists) and EasyEdit's
flat format (`prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, ...`)."""

from __future__ import annotations

from pathlib import Path

from ..requests import EditRequest
from .base import Record, build, pairs, portability, read_with, usable

ROME_FIELDS = {"prompt": "requested_rewrite.prompt", "target": "requested_rewrite.target_new.str",
               "subject": "requested_rewrite.subject", "rephrases": "paraphrase_prompts",
               "locality": "neighborhood_prompts", "portability": "portability"}
EASYEDIT_FIELDS = {"prompt": "prompt", "target": "target_new", "subject": "subject", "rephrases": "rephrase_prompt",
                   "locality": "locality_prompt", "portability": "portability"}


def _ids(obj: Record, name: str) -> dict:
    """What a target object holds besides `str` (e.g. its Wikidata id), as meta entries `<name>_<key>`."""
    return {f"{name}_{k}": v for k, v in obj.rest({"str"}).items()}


def convert_rome(rec: Record) -> list[EditRequest]:
    """One case -> one request: the '{}' prompt filled with the subject, target_new.str as target.

    paraphrase_prompts are rephrases; neighborhood_prompts are locality probes answered with target_true.str
    (also meta["true_object"]); attribute_prompts, generation_prompts, ids and other fields stay in meta.
    """
    rr = rec.obj("requested_rewrite")
    subject = rr.text("subject")
    new, true = rr.obj("target_new"), rr.obj("target_true")
    true_object = true.text("str")
    meta = {**rec.rest({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "portability"}),
            **rr.rest({"prompt", "subject", "target_new", "target_true"}), **_ids(new, "target_new"),
            **_ids(true, "target_true")}
    locality = [(p, true_object) for p in rec.texts("neighborhood_prompts", required=False)]
    return [build(rec, ROME_FIELDS, prompt=rr.fill("prompt", subject), target=new.text("str"), subject=subject,
                  rephrases=[p for p in rec.texts("paraphrase_prompts", required=False) if p.strip()],
                  locality=usable(locality, "locality", meta),
                  portability=usable(portability(rec), "portability", meta),
                  meta={**meta, "true_object": true_object, "format": "counterfact_rome", "record": rec.index})]


def convert_easyedit(rec: Record) -> list[EditRequest]:
    """One record -> one request: prompt -> target_new; ground_truth is meta["true_object"];
    rephrase_prompt (a string or list) are rephrases; locality_prompt/locality_ground_truth (strings or
    parallel lists) are locality probes; other fields (case_id, ...) stay in meta."""
    meta = rec.rest({"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                     "locality_ground_truth", "portability"})
    truths = rec.texts("ground_truth", required=False)
    if truths:
        meta["true_object"] = truths[0]
    locality = pairs(rec, "locality_prompt", "locality_ground_truth") if rec.has("locality_prompt") else []
    return [build(rec, EASYEDIT_FIELDS, prompt=rec.text("prompt"), target=rec.text("target_new"),
                  subject=rec.text("subject") if rec.has("subject") else None,
                  rephrases=[p for p in rec.texts("rephrase_prompt", required=False) if p.strip()],
                  locality=usable(locality, "locality", meta),
                  portability=usable(portability(rec), "portability", meta),
                  meta={**meta, "format": "counterfact_easyedit", "record": rec.index})]


def read_rome(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a CounterFact file in the ROME format (a JSON list of cases)."""
    return read_with(convert_rome, path, limit)


def read_easyedit(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a CounterFact file in EasyEdit's flat format."""
    return read_with(convert_easyedit, path, limit)
