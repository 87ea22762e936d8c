"""Why a WISE/REPAIR edit does not take: the router, or the memory.

Edits the first T facts of a world in calls of 32 with the world presets (plus any `key=value` overrides), then
sorts every edit whose target the final model does not answer (greedy exact match) into:

- not routed: its own prompt reaches no memory;
- other memory: it reaches a memory that does not hold it;
- own memory wrong: it reaches the memory holding it, which does not produce the target;

and checks each memory alone (added to every row, no routing) on the edits it holds. The rephrases the final
model gets wrong are sorted the same way (issue 21's question for WISE's key router: a key from the last prompt
token), with the cosine of each rephrase's routing key to its own edit's key and to the nearest other edit's.

`--sola-keys` also asks what SoLA's router would do here (as benchmarks/grace_diagnostic.py does for GRACE): the
share of rephrases it sends to an edit of their own memory, of probes it sends to any memory, and, with the own
memory forced on every row (routing bypassed), how often it gives the rephrase's target.

    python benchmarks/wise_diagnostic.py --world test-questions --T 100 [--method repair] [mask_ratio=0.5 ...]
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
from editbank.methods.base import get_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--method", default="wise", choices=["wise", "repair"])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--call", type=int, default=32, help="requests per editor call (the bench's)")
    ap.add_argument("--sola-keys", action="store_true", help="also measure SoLA's router on the same edits")
    ap.add_argument("overrides", nargs="*", help="hyperparameter key=value on top of the world preset")
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.overrides)}
    hp = {**get_method(args.method).world_preset, **extra}
    world = World.build(args.world, progress=False)
    reqs = world.edit_requests(n=min(args.T, len(world.editable_facts)), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor.open(world.path, method=args.method, store=Path(tmp) / "s.db", progress=False, **hp)
        edits = []
        for i in range(0, len(reqs), args.call):
            edits += ed.edit(reqs[i : i + args.call], check=False)
        m = ed.method
        ids = [e.id for e in edits]
        ok = m.check(ids)
        memories = m._memories()
        holder = {e: j for j, (_, members) in enumerate(memories) for e in members}
        routed = dict(zip(ids, m.route_prompts([r.prompt for r in reqs]).tolist()))
        alone = sum(sum(m.check_memory(d, members)) for d, members in memories)
        failed = [e for e, good in zip(ids, ok) if not good]
        scores = ed.evaluate(reqs, protocol="greedy_exact_match")
        reph = [(e, p) for e, r in zip(ids, reqs) for p in r.rephrases]
        reph_ok = [x == 1.0 for x in score_pairs(ed, [(p, r.target) for r in reqs for p in r.rephrases],
                                                 "greedy_exact_match")]
        acts, keys = m.activations([p for _, p in reph], with_keys=True)
        reph_routed = m.route_rows(acts, keys).tolist()
        unit = torch.nn.functional.normalize
        held = unit(m.key_parts(torch.stack([m.keys[e] for e in ids]))[0], dim=1)  # last-token keys
        cos = unit(m.key_parts(keys)[0], dim=1) @ held.T
        own_cos = [float(cos[k, ids.index(e)]) for k, (e, _) in enumerate(reph)]
        other_cos = [float(cos[k].clone().index_fill_(0, torch.tensor([ids.index(e)]), -2).max())
                     for k, (e, _) in enumerate(reph)]
        extra_out = {}
        if args.sola_keys:
            delta_of = {e: d for d, members in memories for e in members}
            forced = [answers_with(ed, m, delta_of.get(e), p, r.target)
                      for e, r in zip(ids, reqs) for p in r.rephrases]
            router = SolaRouter(world, Path(tmp) / "sola.db")
            near = router.nearest([r.prompt for r in reqs], [p for _, p in reph])
            probes = [p for r in reqs for p, _ in r.locality]
            probe_hit = [k is not None for k in router.nearest([r.prompt for r in reqs], probes)]
            router.close()
            own = [k is not None and holder.get(ids[k]) == holder.get(e) for k, (e, _) in zip(near, reph)]
            extra_out = {"forced_own_memory_right": round(sum(forced) / len(forced), 3),
                         "sola_keys_routed_own_memory": round(sum(own) / len(own), 3),
                         "sola_keys_probes_routed": round(sum(probe_hit) / max(len(probe_hit), 1), 3),
                         "sola_keys_routed_own_and_forced_right": round(
                             sum(a and b for a, b in zip(own, forced)) / len(own), 3)}
        ed.close()
    rivals = []  # the held edit whose key is nearest each failed edit's own (its rival for the key router)
    for e in failed:
        i = ids.index(e)
        c, k = (held @ held[i]).index_fill_(0, torch.tensor([i]), -2).max(0)
        rivals.append({"prompt": reqs[i].prompt, "rival": reqs[int(k)].prompt, "cos": round(float(c), 6),
                       "same_memory": holder.get(ids[int(k)]) == holder.get(e)})
    out = {"world": args.world, "method": args.method, "T": len(reqs), "overrides": extra,
           "reliability": round(sum(ok) / len(ok), 3),
           "failed": len(failed),
           "not_routed": sum(routed[e] == -1 for e in failed),
           "other_memory": sum(routed[e] not in (-1, holder.get(e)) for e in failed),
           "own_memory_wrong": sum(routed[e] == holder.get(e) for e in failed),
           "failed_rivals": rivals,
           "memory_alone_writes": f"{alone}/{len(holder)}", "memories": len(memories),
           "median_loss": round(sorted(e.stats["loss"] for e in edits)[len(edits) // 2], 3),
           "eval": {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)}}
    bad = [k for k, good in enumerate(reph_ok) if not good]
    out["rephrases"] = {
        "n": len(reph), "wrong": len(bad),
        "not_routed": sum(reph_routed[k] == -1 for k in bad),
        "other_memory": sum(reph_routed[k] not in (-1, holder.get(reph[k][0])) for k in bad),
        "own_memory_wrong": sum(reph_routed[k] == holder.get(reph[k][0]) for k in bad),
        "median_cos_own": round(sorted(own_cos)[len(own_cos) // 2], 3) if own_cos else None,
        "median_cos_nearest_other": round(sorted(other_cos)[len(other_cos) // 2], 3) if other_cos else None,
        "share_nearer_another_edit": round(sum(o > w for o, w in zip(other_cos, own_cos)) / max(len(reph), 1), 3),
        "share_below_gate": round(sum(w < m.hparams.key_threshold for w in own_cos) / max(len(reph), 1), 3),
        **extra_out}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
