"""Which key and which whitening route SoLA's paraphrases without misrouting unrelated prompts? Routing only.

On a world, for every editable fact's edit prompt (the bank's keys, no LoRA trained: routing does not depend on
the LoRAs), each rephrase and each locality probe: the share of rephrases whose nearest key is their own edit's and
within alpha (what generalization can reach), routed to another edit, and the share of probes within alpha of
some key (misrouted). Alpha is the q-quantile of distances between calibration texts of different facts, measured
in-sample (the transform fitted on the same texts, as SoLA does) or cross-fitted (the transform fitted on half
the calibration facts, the distances taken on the other half). Keys:

- `last`: the master module's input at the last prompt token (the paper's; SoLA's `key="last"`);
- `pooled`: the token embeddings averaged over the prompt;
- `last+pooled`: both (SoLA's default);
- `resid:L`: decoder layer L's input at the last token (a key a LoRA at layer < L would change: measured only).

Whitenings: `pca` (SoLA's `whitening="pca"`, on one prompt per calibration fact), `paraphrase` (the within-fact
whitening, SoLA's default), `discriminant` (a full linear discriminant: within-fact whitening, then the
`key_dims` directions that best separate the calibration facts' means).

    python benchmarks/sola_key_spaces.py --world test-context --keys last,last+pooled --q 1e-4,3e-4,1e-3
"""

from __future__ import annotations

import argparse
import json

import torch

from editbank import Editor, World
from editbank.methods.sola import _paraphrase_whitening, _whitening, quantile
from editbank.tokens import make_batch


def keys_of(m, prompts: list[str], key: str) -> torch.Tensor:
    if not key.startswith("resid:"):
        m.hparams.key = key  # the same code path SoLA routes with (the bank is not used)
        return m._prompt_keys(prompts)
    layer, out = int(key.split(":")[1]), []
    for i in range(0, len(prompts), 64):
        b = make_batch(m.tokenizer, [(p, " x") for p in prompts[i : i + 64]])
        with torch.no_grad(), m.disabled():
            h = m.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        h = h.hidden_states[layer]
        out.append(h[torch.arange(h.shape[0]), b.query_index].float())
    return torch.cat(out)


def discriminant(keys, group, dims, shrinkage):
    center, proj = _paraphrase_whitening(keys, group, dims, shrinkage)
    z = (keys - center) @ proj
    labels, inverse = group.unique(return_inverse=True)
    means = torch.zeros(len(labels), z.shape[1]).index_add_(0, inverse, z) / torch.bincount(inverse)[:, None]
    _, _, vb = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    return center, proj @ vb[: min(dims, len(labels) - 1)].T


def unit(center, proj, x):
    return torch.nn.functional.normalize((x - center) @ proj, dim=1)


def different_fact_distances(center, proj, keys, group):
    z = unit(center, proj, keys)
    return (1 - z @ z.T)[torch.triu(group[:, None] != group[None, :], diagonal=1)]


def fit(whitening, keys, group, dims, shrinkage):
    if whitening == "pca":
        return _whitening(keys, dims)
    return (_paraphrase_whitening if whitening == "paraphrase" else discriminant)(keys, group, dims, shrinkage)


def routing(center, proj, alpha, edits, reph, own, probes) -> dict:
    e = unit(center, proj, edits)
    best, j = (1 - unit(center, proj, reph) @ e.T).min(1)
    near = (1 - unit(center, proj, probes) @ e.T).min(1).values
    return {"alpha": round(alpha, 4), "rephrases_to_own": round(float(((j == own) & (best < alpha)).float().mean()), 3),
            "rephrases_to_other": round(float(((j != own) & (best < alpha)).float().mean()), 3),
            "probes_within_alpha": round(float((near < alpha).float().mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default")
    ap.add_argument("--keys", default="last,pooled,last+pooled")
    ap.add_argument("--whitenings", default="pca,paraphrase,discriminant")
    ap.add_argument("--q", default="1e-4,3e-4,1e-3")
    ap.add_argument("--key-dims", type=int, default=64)
    ap.add_argument("--shrinkage", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = World.build(args.world, progress=False)
    reqs = world.edit_requests(n=len(world.editable_facts), seed=args.seed)
    groups = world.calibration_paraphrases()
    texts = [p for g in groups for p in g]
    group = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    corpus = world.fact_prompts()
    reph = [(i, p) for i, r in enumerate(reqs) for p in r.rephrases]
    probes = [p for r in reqs for p, _ in r.locality]
    own = torch.tensor([i for i, _ in reph])
    half = torch.zeros(len(groups), dtype=torch.long)
    half[torch.randperm(len(groups), generator=torch.Generator().manual_seed(args.seed))[len(groups) // 2 :]] = 1
    ed = Editor.open(world.path, method="sola", key="last+pooled")  # the widest key: every part can be read
    m = ed.method
    rows = []
    for key in args.keys.split(","):
        ck, ek = keys_of(m, texts, key), keys_of(m, [r.prompt for r in reqs], key)
        rk, pk, fk = keys_of(m, [p for _, p in reph], key), keys_of(m, probes, key), keys_of(m, corpus, key)
        for whitening in args.whitenings.split(","):
            cal, cal_group = (fk, torch.arange(len(corpus))) if whitening == "pca" else (ck, group)
            center, proj = fit(whitening, cal, cal_group, args.key_dims, args.shrinkage)
            inside = different_fact_distances(center, proj, cal, cal_group)
            crossed = None
            if whitening != "pca":  # fitted on one half of the facts, distances on the other
                crossed = torch.cat([different_fact_distances(
                    *fit(whitening, ck[half[group] != f], group[half[group] != f], args.key_dims, args.shrinkage),
                    ck[half[group] == f], group[half[group] == f]) for f in (0, 1)])
            for q in map(float, args.q.split(",")):
                for calibration, dist in (("in-sample", inside), ("cross-fit", crossed)):
                    if dist is not None:
                        rows.append({"world": args.world, "T": len(reqs), "key": key, "whitening": whitening,
                                     "calibration": calibration, "q": q,
                                     **routing(center, proj, quantile(dist, q), ek, rk, own, pk)})
                        print(json.dumps(rows[-1]), flush=True)
    ed.close()


if __name__ == "__main__":
    main()
