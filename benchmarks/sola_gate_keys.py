"""Behind SoLA's subject gate, which key tells one subject's facts apart? Routing only, no LoRA trained.

On a world, half of each subject's editable facts are edits (their prompts are the keys); each edit's rephrases
should route to it, and the prompt and rephrases of the subject's other facts (not edited) should route nowhere.
Only keys of the row's own subject compete (the gate). For each key, the whitening is SoLA's paraphrase whitening fitted
on the calibration part, and the threshold a quantile of calibration distances: of any two different facts (`q...`) or
of two facts of one subject (`one...`, what SoLA's default uses). Each cell: rephrases routed to their own edit /
prompts of the subject's unedited facts routed to some edit (the gate's risk). Keys: `default` (SoLA's `last+pooled`),
`nosubj` (the pooled part leaves out the subject's tokens), `last` (the last-token part alone), `sentence` (the
pooled part taken from the start of the sentence that names the subject: an opening sentence before it is left out),
`cut` (both parts read from the text cut to that sentence: the model never sees what came before it).

`--prefix` puts a sentence made from a calibration fact (`"<training prompt> <object>."`, never an evaluated fact) in
front of every rephrase and every risky prompt (not of the edits' own prompts): the dev world's test of a key against
an unrelated opening sentence, which its own prompts never have.

    python benchmarks/sola_gate_keys.py --world test-questions
    python benchmarks/sola_gate_keys.py --world default --prefix --modes default,sentence,cut
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch

from editbank import Editor, World
from editbank.methods.sola import _paraphrase_whitening, quantile
from editbank.methods.subject_gate import subject_forms, subject_sentence
from editbank.tokens import make_batch


def cut(text: str, subject: str) -> str:
    """The text from the start of the sentence that names the subject on (SoLA's `key_span="sentence"`)."""
    return subject_sentence(text, subject) or text


def keys(m, texts: list[str], subjects: list[str], mode: str) -> torch.Tensor:
    """Keys [N, width] of prompts, every LoRA off: SoLA's last+pooled ("default"), with the subject's tokens left
    out of the pooled part ("nosubj"), the last-token part alone ("last"), the pooled part from the subject's
    sentence on ("sentence"), both parts of the text cut to that sentence ("cut")."""
    if mode == "cut":
        texts, mode = [cut(t, s) for t, s in zip(texts, subjects)], "default"
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
            if mode == "sentence":
                head = texts[i + r][: len(texts[i + r]) - len(cut(texts[i + r], s))]
                if head:
                    n = len(m.tokenizer(head.rstrip(), add_special_tokens=True)["input_ids"])
                    keep[:n] = False
            pooled = e[r, : q + 1][keep].double().mean(0).float()
            out.append(x[r, q] if mode == "last" else torch.cat([x[r, q], pooled]))
    return torch.stack(out)


def measure(m, world, reqs, edited, held, mode: str, prefix) -> dict:
    groups = world.calibration_paraphrases()
    group_subject = world.calibration_paraphrase_subjects()
    texts = [prefix.calibration(p) for g in groups for p in g]
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

    reph = [(j, prefix(p), reqs[e].subject) for j, e in enumerate(edited) for p in reqs[e].rephrases]
    rd, rj = gated([(p, s) for _, p, s in reph])
    own = torch.tensor([j for j, _, _ in reph])
    hd, _ = gated([(prefix(p), reqs[h].subject) for h in held for p in [reqs[h].prompt, *reqs[h].rephrases]])
    res: dict = {"world": world.name, "key": mode, "prefix": prefix.on, "prefixed_calibration": prefix.calibrated,
                 "one_subject_pairs": int(one.sum())}
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
    ap.add_argument("--prefix", action="store_true", help="an opening sentence before every scored prompt")
    ap.add_argument("--prefix-calibration", action="store_true",
                    help="with --prefix: the calibration texts (whitening, thresholds) get opening sentences too")
    ap.add_argument("--modes", default="default,nosubj,last,sentence,cut")
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
    prefix = Prefixes(world, args.seed) if args.prefix else Prefixes(None, args.seed)
    prefix.calibrated = args.prefix_calibration
    with Editor.open(world.path, method="sola") as ed:
        for mode in args.modes.split(","):
            prefix.rng.seed(args.seed)
            print(json.dumps(measure(ed.method, world, reqs, edited, held, mode, prefix)), flush=True)


class Prefixes:
    """Puts "<training prompt> <object>." of a random calibration fact in front of a prompt (or nothing)."""

    def __init__(self, world, seed: int) -> None:
        self.on, self.rng, self.sentences, self.calibrated = world is not None, random.Random(seed), [], False
        for fact in list(world.calibration_facts) if world is not None else []:
            rel = world.relation(fact.relation)
            self.sentences += [f"{rel.fill(t, fact.subject)} {fact.object}." for t in rel.templates]

    def calibration(self, prompt: str) -> str:
        """A calibration text, with an opening sentence too when `--prefix-calibration` says so."""
        return self(prompt) if self.on and self.calibrated else prompt

    def __call__(self, prompt: str) -> str:
        return f"{self.rng.choice(self.sentences)} {prompt}" if self.on else prompt


if __name__ == "__main__":
    main()
