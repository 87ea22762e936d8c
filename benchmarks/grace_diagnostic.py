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

With T below every editable fact, the prompts and rephrases of the edited subjects' unedited facts are scored too
(`risky_*`: routed to an entry, and answered as the unedited model answers): what a subject gate risks.

`--gate` asks what SoLA's subject gate would do for GRACE routing as it is (`gate=subject` builds it): an entry is
a candidate only for prompts that contain its edit's subject's tokens, and routes within K radii (K = 1, 2, 4, 8,
16) instead of one. Per K: the rephrases whose nearest candidate is their own entry within K radii, those that also
get the target with the entry forced on (at most the generalization GRACE would reach), and the risky prompts routed
to some entry (a GRACE entry replaces the layer's output, so such a prompt would most likely be answered with the
target). Locality probes name other subjects, so the gate routes none of them.

    python benchmarks/grace_diagnostic.py --world test-questions [--T 100] [--gate] [eps_init=3.0 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import SolaRouter, answers_with, parse_value

from editbank import Editor, World
from editbank.evaluate.metrics import score_locality, score_pairs
from editbank.methods.subject_gate import subject_forms
from editbank.tokens import prompt_ids


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {f"q{int(q * 100)}": round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) for q in (0.1, 0.5, 0.9)} if xs else {}


def forced_right(ed: Editor, m, holder: int, prompt: str, target: str) -> bool:
    """Does the entry of edit `holder`, applied whatever the routing, make the model answer `target`?"""
    row = m._row(holder)
    n = int(m.span[row])
    return answers_with(ed, m, m.values[row, :n] if n <= m.values.shape[1] else m.values[row], prompt, target)


def gated_ratios(m, tok, holders: dict[int, str], prompts: list[str]) -> list[tuple[int | None, float]]:
    """Per prompt: (nearest candidate entry's edit, distance over its radius) among the entries whose edit's subject
    occurs in the prompt, or (None, inf) when no subject does."""
    forms = {e: subject_forms(tok, s) for e, s in holders.items()}
    keys = m.prompt_keys(prompts)
    out = []
    for k, p in enumerate(prompts):
        ids = prompt_ids(tok, p)
        cands = [e for e, fs in forms.items()
                 if any(ids[i : i + len(f)] == list(f) for f in fs for i in range(len(ids) - len(f) + 1))]
        if not cands:
            out.append((None, float("inf")))
            continue
        rows = [m._row(e) for e in cands]
        d = torch.linalg.vector_norm(m.keys[rows] - keys[k], dim=1)
        j = int(d.argmin())
        out.append((cands[j], float(d[j] / m.eps[rows[j]].clamp(min=1e-12))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--T", type=int, default=0, help="edits (0: every editable fact)")
    ap.add_argument("--sola-keys", action="store_true", help="also measure SoLA's router on the same edits")
    ap.add_argument("--gate", action="store_true", help="also measure a subject gate with wider radii")
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
        allowed = m.allowed([prompt_ids(ed.tokenizer, p) for p in probes]) if m.gated else None
        pdist, pj = m.nearest(m.prompt_keys(probes), allowed)
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
        edited = {r.key for r in reqs}
        subjects = {r.subject for r in reqs}
        # prompts naming an edited subject, asking a fact that was not edited (its true object as the answer)
        risky_pairs = [(q, " " + r.meta["true_object"]) for r in world.edit_requests(
            n=len(world.editable_facts), seed=0) if r.subject in subjects and r.key not in edited
            for q in (r.prompt, *r.rephrases)]
        risky = [q for q, _ in risky_pairs]
        if risky:  # routed to an entry, and answered as the unedited model answers
            extra_out["risky_prompts"] = len(risky)
            extra_out["risky_routed"] = round(sum(x is not None for x in m.routes(risky)) / len(risky), 3)
            kept = score_locality(ed, risky_pairs, "greedy_exact_match")
            extra_out["risky_kept"] = round(sum(kept) / len(kept), 3)
        if args.gate:
            forced = [forced_right(ed, m, e, p, t) for e, p, t in reph]
            subject_of = {e: r.subject for e, r in zip(ids, reqs)}
            holders = {e: subject_of[e] for e in sorted(set(holder.values()))}
            rg = gated_ratios(m, ed.tokenizer, holders, [p for _, p, _ in reph])
            hg = gated_ratios(m, ed.tokenizer, holders, risky)
            pg = gated_ratios(m, ed.tokenizer, holders, probes)
            extra_out["gate"] = {"risky_prompts": len(risky), "probes_naming_an_edited_subject": sum(
                e is not None for e, _ in pg)}
            for k in (1, 2, 4, 8, 16):
                own_k = [e == h and x <= k for (e, x), (h, _, _) in zip(rg, reph)]
                extra_out["gate"][f"{k} radii"] = {
                    "routed_own": round(sum(own_k) / len(own_k), 3),
                    "routed_own_and_forced_right": round(sum(a and b for a, b in zip(own_k, forced)) / len(own_k), 3),
                    "risky_routed": round(sum(x <= k for _, x in hg) / max(len(hg), 1), 3)}
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
