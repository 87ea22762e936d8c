"""Behind SoLA's subject gate, which key tells one subject's facts apart? Routing only, no LoRA trained.

On a world, half of each subject's editable facts are edits (their prompts are the keys); each edit's rephrases
should route to it, and the prompt and rephrases of the subject's other facts (not edited) should route nowhere.
Only keys of the row's own subject compete (the gate). For each key, the whitening is SoLA's paraphrase whitening fitted
on the calibration part, and the threshold a quantile of calibration distances: of any two different facts (`q...`) or
of two facts of one subject (`one...`, what SoLA's default uses). Each cell: rephrases routed to their own edit /
prompts of the subject's unedited facts routed to some edit (the gate's risk). Keys: `default` (SoLA's `last+pooled`),
`nosubj` (the pooled part leaves out the subject's tokens), `last` (the last-token part alone).

    python benchmarks/sola_gate_keys.py --world test-questions
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch

from editbank import Editor, World
from editbank.methods.sola import _paraphrase_whitening, quantile
from editbank.methods.subject_gate import subject_forms
from editbank.tokens import make_batch


def keys(m, texts: list[str], subjects: list[str], mode: str) -> torch.Tensor:
    """Keys [N, width] of prompts, every LoRA off: SoLA's last+pooled ("default"), with the subject's tokens left
    out of the pooled part ("nosubj"), or the last-token part alone ("last")."""
    out = []
    for i in range(0, len(texts), 64):
        b = make_batch(m.tokenizer, [(p, " x") for p in texts[i : i + 64]])
        x, e = m._keys_at(b.input_ids, b.attention_mask)
        for r, s in enumerate(subjects[i : i + 64]):
            q = int(b.query_index[r])
            ids = b.input_ids[r, : q + 1].tolist()
            keep = torch.ones(q + 1, dtype=torch.bool)
            if mode == "nosubj":
                for f in subject_forms(m.tokenizer, s):
                    for j in range(len(ids) - len(f) + 1):
                        if tuple(ids[j : j + len(f)]) == f:
                            keep[j : j + len(f)] = False
            pooled = e[r, : q + 1][keep].double().mean(0).float()
            out.append(x[r, q] if mode == "last" else torch.cat([x[r, q], pooled]))
    return torch.stack(out)


def measure(m, world, reqs, edited, held, mode: str) -> dict:
    groups = world.calibration_paraphrases()
    group_subject = world.calibration_paraphrase_subjects()
    texts = [p for g in groups for p in g]
    subjects = [group_subject[i] for i, g in enumerate(groups) for _ in g]
    group = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    center, proj = _paraphrase_whitening(keys(m, texts, subjects, mode), group, 64, 0.3)

    def unit(k: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize((k - center) @ proj, dim=1)

    zc = unit(keys(m, texts, subjects, mode))
    d = 1 - zc @ zc.T
    pairs = torch.triu(group[:, None] != group[None, :], diagonal=1)
    one = pairs & torch.tensor([[a == b for b in subjects] for a in subjects])
    ez = unit(keys(m, [reqs[e].prompt for e in edited], [reqs[e].subject for e in edited], mode))
    edit_subject = [reqs[e].subject for e in edited]

    def gated(items: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        dist = 1 - unit(keys(m, [p for p, _ in items], [s for _, s in items], mode)) @ ez.T
        mask = torch.tensor([[t == s for t in edit_subject] for _, s in items])
        return dist.masked_fill(~mask, float("inf")).min(1)

    reph = [(j, p, reqs[e].subject) for j, e in enumerate(edited) for p in reqs[e].rephrases]
    rd, rj = gated([(p, s) for _, p, s in reph])
    own = torch.tensor([j for j, _, _ in reph])
    hd, _ = gated([(p, reqs[h].subject) for h in held for p in [reqs[h].prompt, *reqs[h].rephrases]])
    res: dict = {"world": world.name, "key": mode, "one_subject_pairs": int(one.sum())}
    for name, pool, qs in (("any", d[pairs], (1e-3, 3e-3, 1e-2)), ("one", d[one], (1e-3, 1e-2, 5e-2))):
        for q in qs:
            a = quantile(pool, q)
            res[f"{name} {q:g}"] = [round(float(((rj == own) & (rd < a)).float().mean()), 3),
                                    round(float((hd < a).float().mean()), 3)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World.build(args.world, progress=False)
    reqs = world.edit_requests(n=len(world.editable_facts), seed=args.seed)
    by_subject = defaultdict(list)
    for i, r in enumerate(reqs):
        by_subject[r.subject].append(i)
    rng = random.Random(args.seed)
    edited, held = [], []
    for idx in by_subject.values():
        idx = idx[:]
        rng.shuffle(idx)
        k = max(1, len(idx) // 2)
        edited += idx[:k]
        held += idx[k:]
    with Editor.open(world.path, method="sola") as ed:
        for mode in ("default", "nosubj", "last"):
            print(json.dumps(measure(ed.method, world, reqs, edited, held, mode)), flush=True)


if __name__ == "__main__":
    main()
