"""Why SoLA's rephrases fail: not routed to their edit, or routed but answered wrongly; and the distance picture.

For each data set: T sequential SoLA edits (every editable fact by default), then on the final model, greedy exact
match, every rephrase that fails is put in one of three bins: *not routed* (no key within alpha: the base model
answered), *routed to another edit*, or *routed to its own edit but wrong* (the LoRA, trained on the one prompt,
does not carry over to the paraphrase). It also prints quantiles of the distances from each rephrase to its own
edit's key and from each locality probe (an unrelated prompt) to its nearest key, against alpha, and how many
changed locality probes were misrouted. Calibration uses the data's leak-free corpus (a world's calibration part;
for a dataset, the records held out of the run), exactly as `editbank bench` does.

    python benchmarks/sola_diagnostic.py --data suite              # the held-out test worlds
    python benchmarks/sola_diagnostic.py --data world:default      # the dev world
    python benchmarks/sola_diagnostic.py --data counterfact:PATH --edits 1000
    python benchmarks/sola_diagnostic.py --data world:default --same-subject   # the subject gate's risk

--same-subject edits only half of each subject's drawn facts (the first half of a seeded shuffle) and also scores, as
locality probes, the prompt and rephrases of every fact of an edited subject that was not edited: prompts that name
an edited subject but ask another fact, which the standard probes (other subjects) never are.

One JSON object per data set on stdout with --json, else a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import parse_hp

from editbank import Editor
from editbank.bench import BenchConfig
from editbank.bench.run import load_data
from editbank.evaluate import run_stream
from editbank.evaluate.metrics import score_locality, score_pairs
from editbank.methods.base import EditFailed

Q = (0.1, 0.5, 0.9)


def quantiles(x: torch.Tensor) -> list[float]:
    x = x[torch.isfinite(x)]
    return [round(float(x.quantile(q)), 4) for q in Q] if x.numel() else []


def split_by_subject(reqs: list, seed: int) -> tuple[list, list]:
    """(edited, kept): about half of each subject's requests edited (a seeded shuffle), the rest kept unedited."""
    by: dict = {}
    for r in reqs:
        by.setdefault(r.subject, []).append(r)
    g = torch.Generator().manual_seed(seed)
    edited, kept = [], []
    for subject, rs in by.items():
        if subject is None or len(rs) < 2:
            edited += rs
            continue
        order = torch.randperm(len(rs), generator=g).tolist()
        edited += [rs[i] for i in order[: len(rs) // 2]]
        kept += [rs[i] for i in order[len(rs) // 2 :]]
    return edited, kept


def diagnose(data: str, edits: int | None, seed: int, hp: dict, same_subject: bool = False) -> dict:
    cfg = BenchConfig(methods=["sola"], data=data, edits=[1], seeds=[seed])
    d = load_data(cfg, progress=True)
    reqs = d.draw(min(edits or d.available, d.available), seed)
    kept = []
    if same_subject:
        reqs, kept = split_by_subject(reqs, seed)
    ed = Editor.open(d.model, method="sola", corpus=d.corpus, stats_corpus=d.stats_corpus,
                     paraphrases=d.paraphrases, paraphrase_subjects=d.paraphrase_subjects, **hp)
    t0 = time.perf_counter()
    stream = run_stream(ed, reqs, protocol="greedy_exact_match", progress=True)
    seconds = time.perf_counter() - t0
    m = ed.method
    ids = stream["edits"]
    own = {}
    for i, eid in enumerate(ids):  # a superseded edit's fact is now answered by the edit that superseded it
        while eid in m.superseded_by:
            eid = m.superseded_by[eid]
        own[i] = eid
    reph = [(i, q) for i, r in enumerate(reqs) for q in r.rephrases]
    ok = score_pairs(ed, [(q, reqs[i].target) for i, q in reph], "greedy_exact_match")
    routes = m.routes([q for _, q in reph])
    bins = {"not_routed": 0, "routed_other": 0, "routed_own_wrong": 0}
    for (i, _), s, r in zip(reph, ok, routes):
        if s < 1.0:
            bins["not_routed" if r is None else "routed_own_wrong" if r == own[i] else "routed_other"] += 1
    routed_own = sum(r == own[i] for (i, _), r in zip(reph, routes))
    dist = m.bank.distances(m._prompt_keys([q for _, q in reph])) if reph else torch.empty(0, 0)
    own_d = torch.tensor([float(dist[k, m.bank.slot_of[own[i]]]) for k, (i, _) in enumerate(reph)])
    probes = [p for r in reqs for p in r.locality]
    loc = score_locality(ed, probes, "greedy_exact_match") if probes else []
    near = m.bank.distances(m._prompt_keys([p for p, _ in probes])).min(1).values if probes else torch.empty(0)
    routed = m.routes([p for p, _ in probes])
    changed = [k for k, s in enumerate(loc) if s < 1.0]
    misrouted = sum(routed[k] is not None for k in changed)
    out = {
        "data": data, "T": len(reqs), "seed": seed, "hparams": hp, "alpha": m.alpha,
        "reliability": stream["final"]["reliability"], "generalization": stream["final"]["generalization"],
        "locality": stream["final"]["locality"], "seconds_per_edit": seconds / max(len(reqs), 1),
        "rephrases": len(reph), "rephrases_failed": sum(s < 1.0 for s in ok), **bins,
        "rephrases_routed_own": routed_own,
        "rephrase_to_own_key": quantiles(own_d), "rephrase_within_alpha": float((own_d < m.alpha).float().mean()),
        "probes": len(probes), "probes_changed": len(changed), "probes_changed_misrouted": misrouted,
        "probe_to_nearest_key": quantiles(near), "probe_within_alpha": float((near < m.alpha).float().mean()),
        "probes_routed": sum(r is not None for r in routed) / max(len(probes), 1), "gate_alpha": m.gate_alpha,
        "gate_from": m.gate_from,
    }
    if kept:  # prompts naming an edited subject, asking a fact that was not edited
        same = [(q, r.target) for r in kept for q in [r.prompt, *r.rephrases]]
        kept_loc = score_locality(ed, same, "greedy_exact_match")
        out.update(same_subject_probes=len(same), same_subject_locality=sum(kept_loc) / len(same),
                   same_subject_routed=sum(r is not None for r in m.routes([q for q, _ in same])) / len(same))
    ed.close()
    return out


def table(rows: list[dict]) -> str:
    head = ("| data | T | rel | gen | loc | rephrases failed | not routed | routed to another | routed to own, wrong "
            "| rephrase->own key q10/50/90 | probe->nearest q10/50/90 | alpha | probes changed (misrouted) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['error']} |" + " |" * 11)
            continue
        lines.append(f"| {r['data']} | {r['T']} | {r['reliability']:.3f} | {r['generalization']:.3f} | "
                     f"{r['locality']:.3f} | {r['rephrases_failed']} of {r['rephrases']} | {r['not_routed']} | "
                     f"{r['routed_other']} | {r['routed_own_wrong']} | {'/'.join(map(str, r['rephrase_to_own_key']))} "
                     f"| {'/'.join(map(str, r['probe_to_nearest_key']))} | {r['alpha']:.4f} | "
                     f"{r['probes_changed']} of {r['probes']} ({r['probes_changed_misrouted']}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="suite", help="suite, world:NAME, or FORMAT:PATH (comma-separated list)")
    ap.add_argument("--edits", type=int, default=None, help="T (default: every editable fact / record)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hp", action="append", default=[], help="k=v SoLA hyperparameter (JSON value)")
    ap.add_argument("--same-subject", action="store_true", help="edit half of each subject's facts; probe the rest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from editbank.world.test_specs import SUITE

    parts = [f"world:{w}" for w in SUITE] if args.data == "suite" else args.data.split(",")
    rows = []
    for part in parts:
        try:
            row = diagnose(part, args.edits, args.seed, parse_hp(args.hp), args.same_subject)
        except EditFailed as exc:  # e.g. calibration impossible on this model: say so, go on with the others
            row = {"data": part, "error": str(exc)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(table(rows))


if __name__ == "__main__":
    main()
