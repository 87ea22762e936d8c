"""Lifelong stream on a built-in world: T sequential edits, all evaluated on the final model, then undo.

Prints, measured in one run: median seconds per edit, reliability / generalization / locality under
both protocols, rollback figures, and store bytes per edit.

    python benchmarks/world_stream.py --method grace --edits 500
    python benchmarks/world_stream.py --method ft --edits 100 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import parse_hp
from rich.console import Console
from rich.table import Table

from editbank import Editor, World
from editbank.evaluate import rollback_eval, run_stream
from editbank.tokens import batch_from_ids, pad_id, pair_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="grace")
    ap.add_argument("--edits", type=int, default=200, help="T; capped at the world's number of facts")
    ap.add_argument("--size", default="default", help="world size (small/default) or a spec file")
    ap.add_argument("--undo-fraction", type=float, default=0.1)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: where the model loads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hp", action="append", default=[], help="hyperparameter key=value (JSON value)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    hp = parse_hp(args.hp)

    console = Console(quiet=args.json)
    world = World.build(args.size, progress=not args.json)
    n = min(args.edits, len(world.editable_facts))
    reqs = world.edit_requests(n=n, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        ed = Editor.open(world.path, method=args.method, store=db, device=args.device, seed=args.seed, **hp)
        t0 = time.perf_counter()
        stream = run_stream(ed, reqs, protocol="greedy_exact_match", progress=not args.json)
        tf = ed.evaluate(reqs, protocol="teacher_forced_token_acc")
        per_edit = [e.stats["seconds"] for e in ed.edits()]
        store_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        rb = rollback_eval(ed, ed.edits("active"), fraction=args.undo_fraction, seed=args.seed)
        probes = untouched_probes(ed, [p for r in reqs for p in r.locality])
        undone = untouched_probes(ed, [(ed.store.get_edit(i).request.prompt, ed.store.get_edit(i).request.target)
                                       for i in rb["undone"]])
        ed.close()
    fig = {
        "method": args.method,
        "world": world.name,
        "edits": n,
        "device": str(args.device or "default"),
        "median_seconds_per_edit": statistics.median(per_edit),
        "greedy_exact_match": {k: stream["final"][k] for k in ("reliability", "generalization", "locality")},
        "teacher_forced_token_acc": {k: tf[k] for k in ("reliability", "generalization", "locality")},
        "rollback": {
            "undone": len(rb["undone"]),
            "restored": rb["restored"],
            "max_abs_logit_diff": rb["max_abs_logit_diff"],
            "kept_reliability": rb["kept"]["reliability"] if rb["kept"] else None,
        },
        "store_bytes_per_edit": store_bytes / n,
        "locality_probes": probes,
        "undone_prompts": undone,
        "wall_seconds": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(fig))
        return
    t = Table("metric", "greedy_exact_match", "teacher_forced_token_acc",
              title=f"{args.method}: {n} sequential edits on world '{world.name}', evaluated on the final model")
    for k in ("reliability", "generalization", "locality"):
        t.add_row(k, f"{fig['greedy_exact_match'][k]:.3f}", f"{fig['teacher_forced_token_acc'][k]:.3f}")
    console.print(t)
    r = fig["rollback"]
    console.print(
        f"median {fig['median_seconds_per_edit']:.3f} s/edit; store {fig['store_bytes_per_edit'] / 1024:.1f} KiB/edit; "
        f"undo {r['undone']}: restored {r['restored']:.0%}, max |logit diff| {r['max_abs_logit_diff']:.3g}, "
        f"kept reliability {r['kept_reliability']:.3f}; wall {fig['wall_seconds']:.0f} s"
    )
    for label, x in (("locality probes", probes), ("undone prompts", undone)):
        console.print(
            f"{label} (after the undo): {x['n']}, logits identical to the unedited model: {x['identical']}"
            + (f"; routed by no key: {x['unrouted']}, of which identical: {x['unrouted_identical']}"
               if "unrouted" in x else "")
        )


def untouched_probes(ed: Editor, pairs: list[tuple[str, str]]) -> dict[str, int]:
    """How many probes get logits bit-identical to the unedited model's (and, for methods that can say
    which prompts route, how many of the unrouted ones do)."""
    out: dict[str, int] = {"n": len(pairs), "identical": 0}
    rows = [pair_ids(ed.tokenizer, p, t) for p, t in pairs]
    same = []
    for i in range(0, len(rows), 64):
        b = batch_from_ids(rows[i : i + 64], pad_id(ed.tokenizer), ed.device)
        edited = ed.logits(b.input_ids, b.attention_mask, b.query_index)
        with ed.unedited():
            base = ed.logits(b.input_ids, b.attention_mask, b.query_index)
        same += [torch.equal(edited[j], base[j]) for j in range(len(edited))]
    out["identical"] = sum(same)
    if hasattr(ed.method, "routes"):
        routed = ed.method.routes([p for p, _ in pairs])
        unrouted = [s for s, r in zip(same, routed) if r is None]
        out.update(unrouted=len(unrouted), unrouted_identical=sum(unrouted))
    return out


if __name__ == "__main__":
    main()
