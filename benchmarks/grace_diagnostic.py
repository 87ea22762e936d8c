"""Why a GRACE rephrase is answered wrongly: the router (its key lies outside every radius, or inside another
edit's), or the entry's values (routed to its own edit, which does not spell the target after this wording).

Edits the first T facts of a world (or a dataset's records) one after another with the defaults (plus any
`key=value` overrides), then sorts every rephrase the final model gets wrong (greedy exact match):

- not routed: no entry's radius covers the rephrase's key;
- other edit: it routes to another edit's entry;
- own edit wrong: it routes to its own edit's entry, whose values do not give the target here;

with the distributions of the distance from each rephrase's key to its own edit's key, in units of that entry's
radius (GRACE routes at <= 1), and of each locality probe's distance to the nearest entry (< 1: a probe the
codebook answers). Issue 21 item 4: the failure SoLA had (a key from the last prompt token), measured for GRACE.

`--sola-keys` also asks what SoLA's router would do for GRACE (its keys: master input at the last token plus the
pooled token embeddings, whitened by the calibration part's paraphrase groups, alpha calibrated there): the share
of rephrases it routes to their own edit and of probes it routes anywhere, and, with each rephrase's own entry
forced on (routing bypassed), how often GRACE's values give the target: the generalization GRACE would reach with
SoLA's router is at most the share where both hold.

    python benchmarks/grace_diagnostic.py --world test-questions [--T 100] [eps_init=3.0 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import SolaRouter, answers_with, parse_value

from editbank import Editor, World
from editbank.evaluate.metrics import score_pairs


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {f"q{int(q * 100)}": round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) for q in (0.1, 0.5, 0.9)} if xs else {}


def forced_right(ed: Editor, m, holder: int, prompt: str, target: str) -> bool:
    """Does the entry of edit `holder`, applied whatever the routing, make the model answer `target`?"""
    row = m._row(holder)
    n = int(m.span[row])
    return answers_with(ed, m, m.values[row, :n] if n <= m.values.shape[1] else m.values[row], prompt, target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--T", type=int, default=0, help="edits (0: every editable fact)")
    ap.add_argument("--sola-keys", action="store_true", help="also measure SoLA's router on the same edits")
    ap.add_argument("overrides", nargs="*", help="hyperparameter key=value over the defaults")
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.overrides)}
    world = World.build(args.world, progress=False)
    n = len(world.editable_facts) if args.T <= 0 else min(args.T, len(world.editable_facts))
    reqs = world.edit_requests(n=n, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor.open(world.path, method="grace", store=Path(tmp) / "s.db", progress=False, **extra)
        ids = []
        for i in range(0, len(reqs), 32):  # GRACE writes a call's requests one after another: calls of 1 alike
            ids += [e.id for e in ed.edit(reqs[i : i + 32], check=False)]
        m = ed.method
        # the entry that answers each edit: its own, or the one it widened (GRACE's "expand": same label, nearby)
        holder = {e: e if m.undo_log[e]["created"] else m.undo_log[e]["modified"][0][0] for e in ids}
        reph = [(holder[e], p, t) for e, t, p in ((e, r.target, p) for e, r in zip(ids, reqs) for p in r.rephrases)]
        scores = ed.evaluate(reqs, protocol="greedy_exact_match")
        ok = [x == 1.0 for x in score_pairs(ed, [(p, t) for _, p, t in reph], "greedy_exact_match")]
        routed = m.routes([p for _, p, _ in reph])
        keys = m.prompt_keys([p for _, p, _ in reph])
        own = [m._row(e) for e, _, _ in reph]
        own_dist = torch.linalg.vector_norm(keys - m.keys[own], dim=1) / m.eps[own].clamp(min=1e-12)
        probes = [p for r in reqs for p, _ in r.locality]
        pdist, pj = m.nearest(m.prompt_keys(probes))
        probe_ratio = (pdist / m.eps[pj].clamp(min=1e-12)).tolist()
        radius = m.eps[m.eps > 0]
        extra_out = {}
        if args.sola_keys:
            forced = [forced_right(ed, m, e, p, t) for e, p, t in reph]
            router = SolaRouter(world, Path(tmp) / "sola.db")
            owners = sorted(set(holder.values()))
            prompt_of = dict(zip(ids, (r.prompt for r in reqs)))
            held = [prompt_of[e] for e in owners]
            own = [k is not None and owners[k] == e for k, (e, _, _) in
                   zip(router.nearest(held, [p for _, p, _ in reph]), reph)]
            probe_hit = [k is not None for k in router.nearest(held, probes)]
            router.close()
            extra_out = {"forced_own_entry_right": round(sum(forced) / len(forced), 3),
                         "sola_keys_routed_own": round(sum(own) / len(own), 3),
                         "sola_keys_probes_routed": round(sum(probe_hit) / max(len(probe_hit), 1), 3),
                         "sola_keys_routed_own_and_forced_right": round(
                             sum(a and b for a, b in zip(own, forced)) / len(own), 3)}
        ed.close()
    bad = [k for k, good in enumerate(ok) if not good]
    out = {"world": args.world, "T": len(reqs), "overrides": extra,
           "eval": {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)},
           "widened": sum(holder[e] != e for e in ids), "rephrases": len(reph), "wrong": len(bad),
           "not_routed": sum(routed[k] is None for k in bad),
           "other_edit": sum(routed[k] not in (None, reph[k][0]) for k in bad),
           "own_edit_wrong": sum(routed[k] == reph[k][0] for k in bad),
           "routed_own_share": round(sum(routed[k] == reph[k][0] for k in range(len(reph))) / max(len(reph), 1), 3),
           "rephrase_distance_over_own_radius": quantiles(own_dist.tolist()),
           "probe_distance_over_nearest_radius": quantiles(probe_ratio),
           "probes_within_a_radius": round(sum(x <= 1 for x in probe_ratio) / max(len(probe_ratio), 1), 3),
           "median_radius": round(float(radius.median()), 3) if len(radius) else None, **extra_out}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
