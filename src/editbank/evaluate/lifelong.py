"""Lifelong editing: a sequential stream evaluated on the final model, and rollback evaluation."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..requests import EditRequest
from ..store import Edit
from ..tokens import batch_from_ids, pad_id, pair_ids
from .metrics import _mean, argmax_tokens, check_protocol, evaluate, score_locality, score_pairs


def _progress(total: int, label: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled, transient=False,
        console=Console(stderr=True),
    )
    return prog, prog.add_task(label, total=total)


def run_stream(
    editor,
    requests: list[EditRequest],
    protocol: str = "greedy_exact_match",
    *,
    eval_every: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Apply `requests` one at a time, then evaluate all of them on the final model (WISE protocol).

    With `batch_size=b`, requests go to the editor b at a time (one `editor.edit(list)` call each).

    With `eval_every=k`, after every k edits the edits so far are scored too, giving the retention
    matrix (row t: reliability of edit i after t edits), ERR (mean over past edits) and TRR (locality).
    """
    check_protocol(protocol)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if eval_every and protocol == "prob_preference":
        raise ValueError("eval_every scores bare (prompt, answer) pairs, which prob_preference cannot: "
                         "use greedy_exact_match or teacher_forced_token_acc for the retention matrix")
    requests = list(requests)
    probes = [p for r in requests for p in r.locality]
    if probes and protocol != "prob_preference":
        score_locality(editor, probes, protocol)  # caches the pre-edit predictions before editing
    edits: list[Edit] = []
    retention: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    prog, task = _progress(len(requests), "editing", progress)
    with prog:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            edits += [editor.edit(chunk[0], check=False)] if batch_size == 1 else editor.edit(chunk, check=False)
            prog.advance(task, len(chunk))
            t = start + len(chunk)
            if eval_every and (t % eval_every == 0 or t // eval_every > start // eval_every):
                rel = score_pairs(editor, [(r.prompt, r.target) for r in requests[:t]], protocol)
                loc = score_locality(editor, probes, protocol) if probes else []
                retention.append({"step": t, "reliability": rel, "ERR": _mean(rel), "TRR": _mean(loc)})
    edit_seconds = time.perf_counter() - t0
    final = evaluate(editor, requests, protocol)
    return {
        "protocol": protocol,
        "edits": [e.id for e in edits],
        "edit_seconds": edit_seconds,
        "final": final,
        "retention": retention,
    }


@torch.no_grad()
def _prompt_logits(editor, requests: list[EditRequest]) -> list[torch.Tensor]:
    tok = editor.tokenizer
    rows = [pair_ids(tok, r.prompt, r.target) for r in requests]
    b = batch_from_ids(rows, pad_id(tok), editor.device)
    logits = editor.logits(b.input_ids, b.attention_mask, b.query_index)
    return [logits[i, : len(p) + len(t)].float().cpu() for i, (p, t) in enumerate(rows)]


def rollback_eval(
    editor,
    edits: list[Edit],
    fraction: float = 0.1,
    *,
    seed: int = 0,
    protocol: str = "greedy_exact_match",
    progress: bool = False,
) -> dict[str, Any]:
    """Undo a random `fraction` of `edits`; undone requests must predict what the unedited model did.

    Reports `restored`, the share of undone requests whose teacher-forced argmax at every target
    position equals the unedited model's, `max_abs_logit_diff` from the unedited model on those sequences,
    `identical`, how many of them have bit-identical logits to the unedited model's, and
    the `protocol` scores of the edits that stay (`kept`). The reference is the unedited model, which is
    the model-without-this-edit for methods whose edits are independent (GRACE, SoLA); for methods that
    write shared weights (FT-L) the other edits stay in the weights, so these two figures are informative
    only there.
    """
    check_protocol(protocol)
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    active = [e for e in edits if e.status == "active"]
    if not active:
        raise ValueError("rollback_eval needs at least one active edit")
    k = max(1, round(fraction * len(active)))
    chosen = random.Random(seed).sample(active, k)
    reqs = [e.request for e in chosen]
    tok = editor.tokenizer
    rows = [pair_ids(tok, r.prompt, r.target) for r in reqs]
    with editor.unedited():
        before = argmax_tokens(editor, rows)
        base_logits = _prompt_logits(editor, reqs)
    prog, task = _progress(len(chosen), "undoing", progress)
    with prog:
        for e in chosen:
            editor.undo(e.id)
            prog.advance(task)
    after = argmax_tokens(editor, rows)
    now_logits = _prompt_logits(editor, reqs)
    diffs = [float((a - b).abs().max()) for a, b in zip(now_logits, base_logits)]
    max_diff = max(diffs)
    chosen_ids = {e.id for e in chosen}
    kept = [e.request for e in active if e.id not in chosen_ids]
    return {
        "protocol": protocol,
        "undone": sorted(chosen_ids),
        "restored": _mean([float(a == b) for a, b in zip(after, before)]),
        "max_abs_logit_diff": max_diff,
        "identical": sum(d == 0.0 for d in diffs),  # undone prompts whose logits are bit-identical to the base's
        "kept": evaluate(editor, kept, protocol) if kept else None,
    }
