"""`editbank demo`: sequential edits on the built-in world, evaluation, undo, all in a few minutes."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .editor import Editor
from .evaluate import rollback_eval, run_stream
from .methods import METHODS
from .world import World

PREFERRED = ("sola", "grace", "ft")


def best_method() -> str:
    return next(m for m in PREFERRED if m in METHODS)


def run_demo(
    method: str | None = None,
    n_edits: int = 50,
    n_undo: int = 10,
    size: str = "default",
    console: Console | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the demo; print tables to `console` (None: silent) and return the figures."""
    if n_edits < 1 or not 0 <= n_undo <= n_edits:
        raise ValueError("need edits >= 1 and 0 <= undo <= edits")
    say = console.print if console is not None else (lambda *a, **k: None)
    t0 = time.perf_counter()
    world = World.build(size, progress=console is not None)
    method = method or best_method()
    say(f"world: {world.path} ({len(world.facts)} facts); method: [bold]{method}[/bold]")
    reqs = world.edit_requests(n=n_edits, seed=seed)
    ed = Editor.open(world.path, method=method, seed=seed)
    shown = reqs[:5]
    before = ed.generate([r.prompt for r in shown], max_new_tokens=8)
    stream = run_stream(ed, reqs, protocol="greedy_exact_match", progress=console is not None)
    after = ed.generate([r.prompt for r in shown], max_new_tokens=8)
    tf = ed.evaluate(reqs, protocol="teacher_forced_token_acc")

    table = Table("prompt", "target", "before", "after", title="before / after editing")
    for r, b, a in zip(shown, before, after):
        table.add_row(r.prompt, r.target, b, a)
    say(table)
    metrics = Table("metric", *(p for p in ("greedy_exact_match", "teacher_forced_token_acc")),
                    title=f"{n_edits} sequential edits, all evaluated on the final model")
    for k in ("reliability", "generalization", "locality"):
        metrics.add_row(k, *(f"{rep[k]:.3f}" if rep[k] is not None else "-" for rep in (stream["final"], tf)))
    say(metrics)
    say(f"editing took {stream['edit_seconds']:.1f} s ({stream['edit_seconds'] / n_edits:.2f} s per edit)")
    alpha = getattr(ed.method, "alpha", None)
    if alpha is not None:
        hp = ed.method.hparams
        q = ed.method.quantile_used
        rule = "fixed" if hp.alpha is not None else f"calibrated, P(unrelated prompts closer) = {q:g}"
        say(f"routing: {hp.distance} distance, alpha {alpha:.4f} ({rule})")

    result: dict[str, Any] = {
        "method": method,
        "world": str(world.path),
        "edits": n_edits,
        "final": {k: stream["final"][k] for k in ("protocol", "reliability", "generalization", "locality")},
        "teacher_forced": {k: tf[k] for k in ("protocol", "reliability", "generalization", "locality")},
        "edit_seconds": stream["edit_seconds"],
    }
    if n_undo:
        edits = ed.edits("active")
        rb = rollback_eval(ed, edits, fraction=n_undo / len(edits), seed=seed, protocol="greedy_exact_match")
        undone = [e for e in edits if e.id in set(rb["undone"])][:5]
        with ed.unedited():
            base = ed.generate([e.request.prompt for e in undone], max_new_tokens=8)
        now = ed.generate([e.request.prompt for e in undone], max_new_tokens=8)
        t = Table("prompt", "edited to", "unedited model", "after undo", title=f"undid {len(rb['undone'])} edits")
        for e, b, n in zip(undone, base, now):
            t.add_row(e.request.prompt, e.request.target, b, n)
        say(t)
        kept = rb["kept"]
        n_undone = len(rb["undone"])
        rest = n_undone - rb["identical"]
        say(
            f"undone edits predict what the unedited model did: {rb['restored']:.0%} of {n_undone} (teacher-forced "
            f"argmax at every target position); logits bit-identical to the unedited model's on {rb['identical']} "
            f"of {n_undone}"
            + (f" (the other {rest} differ by at most {rb['max_abs_logit_diff']:.3g} in a logit: a kept edit still "
               "acts on them, a nearby key's adapter for a routed method, the shared weights for a weight-editing "
               "one)" if rest else "")
            + f"; the {kept['n'] if kept else 0} kept edits: reliability {kept['reliability'] if kept else 0:.3f}"
        )
        result["rollback"] = {k: rb[k] for k in ("undone", "restored", "max_abs_logit_diff", "identical")}
        result["rollback"]["kept_reliability"] = kept["reliability"] if kept else None
    ed.close()
    result["seconds"] = time.perf_counter() - t0
    say(f"demo finished in {result['seconds']:.0f} s")
    return result
