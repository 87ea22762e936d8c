"""Would a subject-token key route paraphrases that the last-token key misses? A measurement, no routing changed.

On a world, for every edit request, rephrase and locality probe, the key SoLA would take at the master module's input
at two positions: the last prompt token (SoLA's key today) and the subject's last token. Each kind is whitened on the
world's calibration prompts (the same `_whitening` SoLA uses) and its alpha is the `--quantile` quantile of distances
between calibration prompts of *different subjects*. Printed per key kind: distance quantiles (10/50/90%) of each
rephrase to its own request's key and of each locality probe to the nearest request key, the share within alpha, and
(subject key) how many probes within alpha share their nearest request's subject (a subject's other facts: these
must be told apart by the relation, so a subject key can only be one half of a rule).

    python benchmarks/sola_subject_keys.py --world test-context
"""

from __future__ import annotations

import argparse
import json

import torch

from editbank import Editor, World
from editbank.methods.sola import _whitening, quantile
from editbank.tokens import prompt_ids

Q = (0.1, 0.5, 0.9)


def subject_of(text: str, subjects: list[str]) -> str | None:
    hits = [s for s in subjects if s in text]
    return max(hits, key=len) if hits else None


def keys(ed, texts: list[str], subjects: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-token keys, subject-last-token keys) [N, D]; a text without a subject gets its last token twice."""
    m, tok = ed.method, ed.tokenizer
    last, subj = [], []
    for text, s in zip(texts, subjects):
        ids = torch.tensor([prompt_ids(tok, text)])
        k = m._keys_at(ids, torch.ones_like(ids))[0][0]
        pos = len(prompt_ids(tok, text[: text.index(s) + len(s)])) - 1 if s else k.shape[0] - 1
        last.append(k[-1])
        subj.append(k[min(pos, k.shape[0] - 1)])
    return torch.stack(last), torch.stack(subj)


def dist(a: torch.Tensor, b: torch.Tensor, center, proj) -> torch.Tensor:
    za = torch.nn.functional.normalize((a - center) @ proj, dim=1)
    zb = torch.nn.functional.normalize((b - center) @ proj, dim=1)
    return 1 - za @ zb.T


def qs(x: torch.Tensor) -> list[float]:
    return [round(float(x.quantile(q)), 4) for q in Q]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="test-context")
    ap.add_argument("--quantile", type=float, default=1e-4)
    ap.add_argument("--key-dims", type=int, default=64)
    args = ap.parse_args()
    w = World.build(args.world, progress=False)
    subjects = sorted({f.subject for f in w.facts})
    corpus = w.fact_prompts()
    reqs = w.edit_requests(n=len(w.editable_facts), seed=0)
    ed = Editor.open(w.path, method="sola")
    c_sub = [subject_of(p, subjects) for p in corpus]
    c_last, c_subj = keys(ed, corpus, c_sub)
    r_last, r_subj = keys(ed, [r.prompt for r in reqs], [r.subject for r in reqs])
    reph = [(i, q) for i, r in enumerate(reqs) for q in r.rephrases]
    p_last, p_subj = keys(ed, [q for _, q in reph], [reqs[i].subject if reqs[i].subject in q else
                                                     subject_of(q, subjects) for i, q in reph])
    probes = [p for r in reqs for p, _ in r.locality]
    pr_sub = [subject_of(p, subjects) for p in probes]
    l_last, l_subj = keys(ed, probes, pr_sub)
    own = torch.tensor([i for i, _ in reph])
    out = {"world": args.world, "T": len(reqs)}
    for kind, ck, rk, pk, lk in (("last", c_last, r_last, p_last, l_last), ("subject", c_subj, r_subj, p_subj, l_subj)):
        center, proj = _whitening(ck, min(args.key_dims, len(ck) // 4))
        d_c = dist(ck, ck, center, proj)
        other = torch.tensor([[a != b for b in c_sub] for a in c_sub]) & torch.triu(torch.ones_like(d_c), 1).bool()
        alpha = quantile(d_c[other].sort().values, args.quantile)
        d_own = dist(pk, rk, center, proj)[torch.arange(len(reph)), own]
        near, who = dist(lk, rk, center, proj).min(1)
        within = near < alpha
        same_subject = sum(bool(wi) and pr_sub[k] == reqs[int(who[k])].subject for k, wi in enumerate(within))
        out[kind] = {"alpha": round(float(alpha), 4), "rephrase_to_own": qs(d_own),
                     "rephrase_within_alpha": round(float((d_own < alpha).float().mean()), 3),
                     "probe_to_nearest": qs(near), "probe_within_alpha": round(float(within.float().mean()), 3),
                     "probes_within_alpha_same_subject": same_subject}
    ed.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
