"""Does an edit or an undo cost more as the store grows? Measured in one run, per method.

One stream of `--edits` edits per method into a store on disk (a temporary folder), on a built world's model
(`--world`, default "small": a small model makes the bookkeeping, which is what could grow, a large share of each
edit), each method with its world preset as `editbank bench` runs it (`--no-presets`: its defaults). The
requests are the world's edit requests with numbered subjects ("Arvelia 17"), so every prompt is distinct.
Printed per method:

- seconds per edit over edits 1..W and over the last W (`--window`, default 50) and their ratio (the goal: at
  most 1.3 for the routed methods);
- seconds per undo at T = 100 and at T = `--edits` (the mean of `--undos` undos of random held edits, each
  followed by the same edit again so the stream goes on unchanged), their ratio, how many of those undos the
  method did in place (`undo_in_place`: GRACE recomputes only the later edits the undo can change) and their own
  mean seconds, with the part of them the recomputed decisions took (the rest is the undo's bookkeeping; the share
  of undos done in place grows with T, and they cost more than a removal), how many the
  editor did by replay and how many edits each re-applied on average (a replay re-applies every held edit after
  the last snapshot before the undone one: an undo of an early edit replays the stream after it);
- the store's size per edit.

    python benchmarks/edit_cost.py                            # grace, sola, wise, repair, ft; 1000 edits
    python benchmarks/edit_cost.py --methods grace --edits 200 --window 20
    python benchmarks/edit_cost.py --methods wise --edits 300 --cpu-time   # beside other jobs: CPU seconds
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import parse_hp

from editbank import Editor, EditRequest
from editbank.methods.base import get_method
from editbank.world import World


def requests_for(world: World, n: int) -> list[EditRequest]:
    """n distinct requests: the world's edit requests, their subjects numbered."""
    base = world.edit_requests(n=len(world.editable_facts), seed=0)
    out = []
    for k in range(n):
        r = base[k % len(base)]
        subject = f"{r.subject} {k // len(base)}" if k >= len(base) else r.subject
        out.append(EditRequest(prompt=r.prompt.replace(r.subject, subject), target=r.target, subject=subject,
                               key=f"{subject}/{r.meta.get('relation')}"))
    return out


def undo_cost(ed: Editor, rng: random.Random, k: int, clock) -> tuple[float, int, float, int, float, float, float]:
    """Mean seconds of k undos of random held edits (each re-edited after), how many the editor did by replay, the
    mean number of edits those replays re-applied, how many the method did in place (`undo_in_place`), the mean
    number of later edits those recomputed, their mean seconds and the mean seconds of the recomputed decisions in
    them (NaN: none)."""
    seconds, exact, applied, walked, in_place, deciding = [], [], [], [], [], []
    remove, apply, walk = ed.method.remove, ed.method.apply, ed.method.undo_in_place
    ed.method.remove = lambda eid: exact.append(remove(eid)) or exact[-1]  # False: in place, or a replay

    decided = []  # the seconds of each GRACE decision an undo in place recomputed (`_apply_one` runs only for those
    # during an undo): the rest of the undo is its bookkeeping
    one = getattr(ed.method, "_apply_one", None)

    def deciding_one(item):
        t0 = clock()
        out = one(item)
        decided.append(clock() - t0)
        return out

    if one is not None:
        ed.method._apply_one = deciding_one

    def walking(*a):
        decided.clear()
        out = walk(*a)
        if out is not None:
            walked.append(len(decided))
            deciding.append(sum(decided))
        return out

    ed.method.undo_in_place = walking
    ed.method.apply = lambda items: applied.append(len(items)) or apply(items)
    try:
        for _ in range(k):
            e = rng.choice(ed.edits("active"))
            t0 = clock()
            before = len(walked)
            ed.undo(e.id)
            seconds.append(clock() - t0)
            if len(walked) > before:
                in_place.append(seconds[-1])
            ed.method.apply = apply
            ed.edit(e.request, check=False)
            ed.method.apply = lambda items: applied.append(len(items)) or apply(items)
    finally:
        ed.method.remove, ed.method.apply, ed.method.undo_in_place = remove, apply, walk
        if one is not None:
            ed.method._apply_one = one
    nan = float("nan")
    return (statistics.mean(seconds), exact.count(False) - len(walked), sum(applied) / k, len(walked),
            statistics.mean(walked) if walked else 0.0, statistics.mean(in_place) if in_place else nan,
            statistics.mean(deciding) if deciding else nan)


def run(method: str, world: World, reqs: list[EditRequest], args, hp: dict) -> dict:
    # `--cpu-time`: this process's CPU seconds (steadier beside other jobs) instead of wall seconds
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "cost.db"
        preset = {} if args.no_presets else get_method(method).world_preset
        ed = Editor.open(world.path, method, store=store, corpus=world.fact_prompts(),
                         stats_corpus=world.calibration_texts(), paraphrases=world.calibration_paraphrases(),
                         **{**preset, **hp})
        ed.method.prepare()  # calibration is one-time work, not an edit's cost
        times: list[float] = []
        undo: dict[int, tuple[float, int, float, int, float, float]] = {}
        marks = sorted({min(100, len(reqs)), len(reqs)})
        for i in range(0, len(reqs), args.batch):
            chunk = reqs[i : i + args.batch]
            t0 = clock()
            ed.edit(chunk, check=False)
            times += [(clock() - t0) / len(chunk)] * len(chunk)
            done = i + len(chunk)
            if done in marks:
                undo[done] = undo_cost(ed, rng, args.undos, clock)
            if args.progress and done % 100 == 0:
                print(f"  {method}: {done} edits, last {statistics.mean(times[-args.window:]):.3f} s/edit", flush=True)
        ed.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("cost.db*"))
    w = args.window
    first, last = statistics.mean(times[:w]), statistics.mean(times[-w:])
    (u1, r1, a1, w1, c1, s1, d1), (u2, r2, a2, w2, c2, s2, d2) = undo[min(undo)], undo[max(undo)]
    return {"method": method, "first": first, "last": last, "ratio": last / first, "undo": (u1, u2),
            "undo_ratio": u2 / u1, "replays": (r1, r2), "reapplied": (a1, a2), "in_place": (w1, w2),
            "recomputed": (c1, c2), "in_place_seconds": (s1, s2), "deciding": (d1, d2),
            "bytes_per_edit": size / len(reqs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="grace,sola,wise,repair,ft")
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--undos", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="requests per editor call")
    p.add_argument("--world", default="small")
    p.add_argument("--hp", action="append", default=[], help="method:key=value (a method's hyperparameter)")
    p.add_argument("--no-presets", action="store_true", help="the methods' defaults, not their world presets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="CPU seconds of this process instead of wall seconds "
                   "(one thread: the same work, steady when other jobs share the cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = World.build(args.world, progress=False)
    reqs = requests_for(world, args.edits)
    hps: dict[str, dict] = {}
    for item in args.hp:
        m, _, kv = item.partition(":")
        hps.setdefault(m, {}).update(parse_hp([kv]))
    print(f"world {args.world}, {args.edits} edits in calls of {args.batch}, window {args.window}, "
          f"{args.undos} undos at each T, {args.threads} thread(s), {'CPU' if args.cpu_time else 'wall'} seconds")
    print("| method | s/edit 1..W | s/edit last W | ratio | s/undo T=100 | s/undo T=max | ratio | undos in place "
          "(edits recomputed per undo) | s/undo in place T=100, T=max (of which recomputed decisions) | "
          "undos replayed | edits re-applied per undo | store bytes/edit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods.split(","):
        r = run(m, world, reqs, args, hps.get(m, {}))
        print(f"| {m} | {r['first']:.4f} | {r['last']:.4f} | {r['ratio']:.2f} | {r['undo'][0]:.4f} | "
              f"{r['undo'][1]:.4f} | {r['undo_ratio']:.2f} | {r['in_place'][0]}, {r['in_place'][1]} of {args.undos} "
              f"({r['recomputed'][0]:.1f}, {r['recomputed'][1]:.1f}) | "
              f"{r['in_place_seconds'][0]:.4f} ({r['deciding'][0]:.4f}), "
              f"{r['in_place_seconds'][1]:.4f} ({r['deciding'][1]:.4f}) | "
              f"{r['replays'][0]}, {r['replays'][1]} of "
              f"{args.undos} | {r['reapplied'][0]:.0f}, {r['reapplied'][1]:.0f} | {r['bytes_per_edit']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
