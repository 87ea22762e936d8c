"""SoLA on a world: T sequential edits, then reliability / generalization / locality for a sweep of alpha.

The edits are made once with the default calibration; the sweep then changes only the routing threshold
(alpha = the q-quantile of unrelated-prompt distances; with a fixed alpha and raw keys, multiples of it)
and re-evaluates the same bank on the final model, greedy exact match. Prints one row per alpha.

    python benchmarks/sola_alpha_sweep.py --size default --edits 450
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import parse_hp

from editbank import Editor
from editbank.methods.sola import quantile
from editbank.world import World

QUANTILES = [1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default")
    ap.add_argument("--edits", type=int, default=450)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--protocol", default="greedy_exact_match")
    ap.add_argument("--hp", action="append", default=[], help="k=v SoLA hyperparameter (JSON value)")
    ap.add_argument("--quantiles", default=",".join(f"{q:g}" for q in QUANTILES), help="alphaquantile values")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    hp = parse_hp(args.hp)

    world = World.build(args.size, progress=True)
    requests = world.edit_requests(min(args.edits, len(world.editable_facts)), seed=args.seed)
    ed = Editor.open(world, method="sola", device=args.device, progress=True, **hp)
    t0 = time.perf_counter()
    for r in requests:
        ed.edit(r, check=False)
    per_edit = (time.perf_counter() - t0) / len(requests)
    m = ed.method
    default_alpha = m.alpha
    rows = []
    if getattr(m, "calibration_distances", None) is not None:  # calibrated: sweep the quantile
        quantiles = [float(q) for q in args.quantiles.split(",")]
        alphas = [(f"q={q:g}", quantile(m.calibration_distances, q)) for q in quantiles]
        alphas += [("paper 0.01", 0.01), ("default", default_alpha)]
    else:  # a fixed alpha on raw keys (preset="paper"): sweep multiples of it
        alphas = [(f"{f:g} x alpha", f * default_alpha) for f in (0.3, 1, 3, 10, 30, 100)]
    for label, alpha in alphas:
        m.alpha = alpha
        res = ed.evaluate(requests, protocol=args.protocol)
        scores = {k: res[k] for k in ("reliability", "generalization", "locality")}
        rows.append({"alpha": alpha, "label": label, **scores})
    m.alpha = default_alpha
    supersedes = sum(1 for e in ed.edits() if e.status == "superseded")
    if args.json:
        out = {"edits": len(requests), "seconds_per_edit": per_edit, "supersedes": supersedes, "rows": rows}
        print(json.dumps(out))
        return
    print(f"{len(requests)} edits on the {args.size} world, {per_edit:.3f} s/edit, {supersedes} superseded; "
          f"protocol {args.protocol}, evaluated on the final model")
    print(f"{'alpha':>10} {'rule':>12} {'rel':>6} {'gen':>6} {'loc':>6}")
    for r in rows:
        scores = " ".join(f"{r[k]:6.3f}" for k in ("reliability", "generalization", "locality"))
        print(f"{r['alpha']:10.4f} {r['label']:>12} {scores}")
    ed.close()


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
