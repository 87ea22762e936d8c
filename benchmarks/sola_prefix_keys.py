"""Would several keys per SoLA edit, taken under context prefixes, route the paraphrases the one key misses?

A measurement on the real edited bank, no routing changed. On a world, SoLA edits the first T facts (its defaults,
the world's calibration corpus). Every edit then also gets K "prefix keys": the key of `prefix + " " + prompt` for K
sentences made from the world's calibration facts (`"<training prompt> <object>."`; never an evaluated fact), as
ROME's context templates put text before a prompt. With SoLA's own whitening and alpha, for each rule (one key;
the nearest of the 1 + K keys):

- rephrases routed to their own edit (the share generalization can reach) and to another edit;
- locality probes within alpha of some key (misrouted: what locality loses).

    python benchmarks/sola_prefix_keys.py --world test-context --T 200 --prefixes 4
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from editbank import Editor, World


def unit(bank, raw: torch.Tensor) -> torch.Tensor:
    return bank.index_form(raw)


def rule(q: torch.Tensor, keys: torch.Tensor, owner: torch.Tensor, alpha: float) -> torch.Tensor:
    """The edit each query routes to under cosine distance (-1: none within alpha)."""
    d = 1 - q @ keys.T
    best, j = d.min(dim=1)
    return torch.where(best < alpha, owner[j], torch.full_like(j, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World.build(args.world, progress=False)
    reqs = world.edit_requests(n=min(args.T, len(world.editable_facts)), seed=args.seed)
    rng = random.Random(args.seed)
    facts = list(world.calibration_facts)
    sentences = []
    for fact in rng.sample(facts, min(len(facts), args.prefixes)):
        rel = world.relation(fact.relation)
        sentences.append(f"{rel.fill(rng.choice(rel.templates), fact.subject)} {fact.object}.")
    with tempfile.TemporaryDirectory() as tmp:
        ed = Editor.open(world.path, method="sola", store=Path(tmp) / "s.db", progress=False)
        if ed.method.hparams.distance != "cosine":
            raise SystemExit("this measurement assumes SoLA's cosine distance")
        for r in reqs:
            ed.edit(r, check=False)
        m = ed.method
        alpha = float(m.alpha)
        ids = torch.arange(len(reqs))
        one = unit(m.bank, m._prompt_keys([r.prompt for r in reqs]))
        extra = unit(m.bank, m._prompt_keys([f"{s} {r.prompt}" for r in reqs for s in sentences]))
        many = torch.cat([one, extra])
        owner_many = torch.cat([ids, ids.repeat_interleave(len(sentences))])
        reph = [(i, p) for i, r in enumerate(reqs) for p in r.rephrases]
        probes = [p for r in reqs for p, _ in r.locality]
        qr = unit(m.bank, m._prompt_keys([p for _, p in reph]))
        qp = unit(m.bank, m._prompt_keys(probes))
        own = torch.tensor([i for i, _ in reph])
        out = {"world": args.world, "T": len(reqs), "prefixes": sentences, "alpha": round(alpha, 4)}
        for name, keys, owner in (("one key", one, ids), (f"1 + {len(sentences)} prefix keys", many, owner_many)):
            rr, rp = rule(qr, keys, owner, alpha), rule(qp, keys, owner, alpha)
            out[name] = {"rephrases_to_own": round(float((rr == own).float().mean()), 3),
                         "rephrases_to_other": round(float(((rr >= 0) & (rr != own)).float().mean()), 3),
                         "probes_within_alpha": round(float((rp >= 0).float().mean()), 3)}
        ed.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
