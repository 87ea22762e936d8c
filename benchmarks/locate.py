"""ROME / MEMIT / AlphaEdit / MetaKE under the AlphaEdit protocol: sequential batches, final-model evaluation.

Each method gets one stream of max(T) counterfactual requests (`World.edit_requests(max T, seed)`), fed in
sequential batches of `--batch`; when the stream has reached each T in `--T`, the first T requests are evaluated
on that model (which is exactly a fresh run on those T requests) under greedy_exact_match and prob_preference
(CounterFact's P(new) > P(true)): efficacy (reliability), generalization (rephrases) and specificity (locality).
Seconds per batch: the median wall time of one `editor.edit(batch)` call of a full batch. One run gives all figures.

    python benchmarks/locate.py --size default --T 100,450
    python benchmarks/locate.py --size large --T 1000 --methods alphaedit,metake,memit --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import parse_hp
from rich.console import Console
from rich.table import Table

from editbank import Editor, World
from editbank.evaluate import evaluate
from editbank.evaluate.metrics import score_locality

PROTOCOLS = ("greedy_exact_match", "prob_preference")
METRICS = {"efficacy": "reliability", "generalization": "generalization", "specificity": "locality"}


def run_method(world: World, method: str, reqs: list, ts: list[int], args, hp: dict[str, Any], console: Console):
    """Stream `reqs` into a fresh editor in batches; yield one figure dict per T in `ts` (ascending)."""
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor.open(world.path, method=method, store=Path(tmp) / "bench.db", device=args.device,
                         seed=args.seed, **hp)
        score_locality(ed, [p for r in reqs for p in r.locality], "greedy_exact_match")  # pre-edit refs, cached
        seconds: list[float] = []
        sizes: list[int] = []
        done, t0 = 0, time.perf_counter()
        for t in ts:
            while done < t:
                chunk = reqs[done : min(done + args.batch, t)]
                s = time.perf_counter()
                ed.edit(chunk, check=False)
                seconds.append(time.perf_counter() - s)
                sizes.append(len(chunk))
                done += len(chunk)
                console.log(f"{method}: {done}/{ts[-1]} edits, last batch {seconds[-1]:.1f} s")
            fig: dict[str, Any] = {"method": method, "world": world.name, "T": t, "batch": args.batch}
            for proto in PROTOCOLS:
                rep = evaluate(ed, reqs[:t], proto)
                fig[proto] = {name: rep[key] for name, key in METRICS.items()}
            full = [x for x, n in zip(seconds, sizes) if n == args.batch] or seconds  # a short last batch is faster
            fig["seconds_per_batch"] = statistics.median(full)
            fig["edit_seconds"] = sum(seconds)
            fig["wall_seconds"] = time.perf_counter() - t0
            yield fig
        ed.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rome,memit,alphaedit,metake")
    ap.add_argument("--T", default="100,1000", help="comma-separated stream lengths (clamped to the editable facts)")
    ap.add_argument("--batch", type=int, default=100, help="edits per editor.edit call (AlphaEdit: 100)")
    ap.add_argument("--size", default="default", help="world size (small/default/large) or a spec file")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: where the model loads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hp", action="append", default=[], help="hyperparameter key=value (JSON value), all methods")
    ap.add_argument("--json", action="store_true", help="print one JSON line per (method, T)")
    args = ap.parse_args()
    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    hp = parse_hp(args.hp)

    console = Console(stderr=True)  # progress and notes on stderr, so --json stdout holds only JSON lines
    world = World.build(args.size, progress=not args.json)
    cap = len(world.editable_facts)
    ts = []
    for t in (int(x) for x in args.T.split(",")):
        if t > cap:
            console.print(f"note: T={t} is more than world '{world.name}' has editable facts; using T={cap}")
        ts.append(min(t, cap))
    ts = sorted(set(ts))
    reqs = world.edit_requests(n=ts[-1], seed=args.seed)

    figs, out = [], sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # progress bars (e.g. key statistics) stay off the JSON lines
        for method in args.methods.split(","):
            for fig in run_method(world, method, reqs, ts, args, hp, console):
                figs.append(fig)
                if args.json:
                    print(json.dumps(fig), file=out, flush=True)
    if args.json:
        return
    t = Table("method", "T", *(f"{m}\n{p}" for p in ("greedy", "P(new)>P(true)") for m in METRICS), "s/batch",
              title=f"sequential batches of {args.batch} on world '{world.name}', evaluated on the final model",
              caption="greedy: greedy_exact_match; P(new)>P(true): prob_preference")
    for f in figs:
        cells = [f"{f[p][m]:.3f}" for p in PROTOCOLS for m in METRICS]
        t.add_row(f["method"], str(f["T"]), *cells, f"{f['seconds_per_batch']:.1f}")
    Console(width=max(Console().width, 130)).print(t)


if __name__ == "__main__":
    main()
