"""Per-request scores with protocol tags: reliability, generalization, locality, portability, fluency.

Protocols
- `teacher_forced_token_acc` (EasyEdit's default): feed prompt+answer, take the argmax at every answer
  position, score the share of answer tokens predicted right. Locality: share of positions whose
  argmax equals the unedited model's argmax.
- `greedy_exact_match`: greedy generation of len(answer) tokens must equal the answer. Computed
  exactly in one batched forward: greedy decoding reproduces the answer iff, teacher-forced on the
  answer, every position's argmax is the next answer token. Locality: the edited model's greedy
  continuation equals the unedited model's (checked the same way against the cached pre-edit one).
- `prob_preference` (CounterFact's efficacy/paraphrase score): the edited model's mean target-token
  log-probability of the new target beats that of the true object (`EditRequest.meta["true_object"]`), on the
  prompt (reliability) and each rephrase (generalization). Locality (CounterFact's neighborhood score): on each
  locality probe the probe's own answer stays more likely than the edit's new target. Portability has no
  "true" alternative, so it is None under this protocol.
Routing happens at the last prompt token in every case, as in generation.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from ..requests import EditRequest, normalize_target
from ..tokens import batch_from_ids, pad_id, pair_ids, prompt_ids

PROTOCOLS = ("teacher_forced_token_acc", "greedy_exact_match", "prob_preference")
FLUENCY_PROTOCOL = "ngram_entropy_2_3"
PERPLEXITY_PROTOCOL = "target_token_perplexity"  # exp(mean over requests of the mean target-token NLL)


def check_protocol(protocol: str) -> str:
    """Return `protocol` if it is one of PROTOCOLS, else raise ValueError listing them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; available: {list(PROTOCOLS)}")
    return protocol


def _pairwise_only(protocol: str, what: str) -> None:
    if protocol == "prob_preference":
        raise ValueError(
            f"prob_preference compares two answers, so {what} cannot score bare pairs under it; "
            "use evaluate(editor, requests, protocol='prob_preference')"
        )


def argmax_tokens(editor, rows: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[list[int]]:
    """Teacher-forced argmax at each target position of (prompt ids, target ids) rows."""
    out: list[list[int]] = []
    pad = pad_id(editor.tokenizer)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = batch_from_ids(chunk, pad, editor.device)
        logits = editor.logits(b.input_ids, b.attention_mask, b.query_index)
        pred = logits.argmax(-1).tolist()
        for r, (p, t) in enumerate(chunk):
            out.append(pred[r][len(p) - 1 : len(p) - 1 + len(t)])
    return out


@torch.no_grad()
def target_nll(editor, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """Mean negative log-likelihood (nats) of each answer's tokens given its prompt."""
    tok, out = editor.tokenizer, []
    for i in range(0, len(pairs), batch_size):
        b = batch_from_ids([pair_ids(tok, p, a) for p, a in pairs[i : i + batch_size]], pad_id(tok), editor.device)
        logp = editor.logits(b.input_ids, b.attention_mask, b.query_index).float().log_softmax(-1)
        labels = b.labels[:, 1:]
        nll = -logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels >= 0)
        out.extend((nll.sum(1) / (labels >= 0).sum(1)).tolist())
    return out


@torch.no_grad()
def greedy_tokens(editor, prompts: list[list[int]], n: list[int], batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of n[i] tokens for each prompt, routing fixed at the last prompt token."""
    out: list[list[int]] = []
    pad = pad_id(editor.tokenizer)
    for i in range(0, len(prompts), batch_size):
        rows = [(p, []) for p in prompts[i : i + batch_size]]
        need = n[i : i + batch_size]
        for _ in range(max(need, default=0)):
            b = batch_from_ids(rows, pad, editor.device)
            logits = editor.logits(b.input_ids, b.attention_mask, b.query_index)
            last = b.attention_mask.sum(1) - 1
            nxt = logits[torch.arange(len(rows), device=last.device), last].argmax(-1).tolist()
            rows = [(p, t + [tok]) if len(t) < k else (p, t) for (p, t), tok, k in zip(rows, nxt, need)]
        out.extend(t for _, t in rows)
    return out


def _score(pred: list[int], ref: list[int], protocol: str) -> float:
    hits = [a == b for a, b in zip(pred, ref)]
    if protocol == "greedy_exact_match":
        return float(all(hits) and len(pred) == len(ref))
    return sum(hits) / max(len(ref), 1)


def base_locality_refs(editor, probes: list[tuple[str, str]], protocol: str) -> list[list[int]]:
    """What the unedited model predicts on each locality probe (cached on the editor)."""
    cache = editor._base_cache
    missing = [p for p in dict.fromkeys(probes) if (protocol, *p) not in cache]
    if missing:
        tok = editor.tokenizer
        with editor.unedited():
            if protocol == "greedy_exact_match":
                prompts = [prompt_ids(tok, p) for p, _ in missing]
                refs = greedy_tokens(editor, prompts, [len(pair_ids(tok, p, a)[1]) for p, a in missing])
            else:
                rows = [pair_ids(tok, p, a) for p, a in missing]
                refs = argmax_tokens(editor, rows)
        for p, r in zip(missing, refs):
            cache[(protocol, *p)] = r
    return [cache[(protocol, *p)] for p in probes]


def score_pairs(editor, pairs: list[tuple[str, str]], protocol: str) -> list[float]:
    """Score (prompt, answer) pairs: does the current model produce the answer?"""
    _pairwise_only(protocol, "score_pairs")
    tok = editor.tokenizer
    rows = [pair_ids(tok, p, a) for p, a in pairs]
    return [_score(pred, t, protocol) for pred, (_, t) in zip(argmax_tokens(editor, rows), rows)]


def score_locality(editor, probes: list[tuple[str, str]], protocol: str) -> list[float]:
    """Score locality probes: does the current model predict what the unedited model predicted?"""
    _pairwise_only(protocol, "score_locality")
    tok = editor.tokenizer
    refs = base_locality_refs(editor, probes, protocol)
    if protocol == "greedy_exact_match":
        rows = [(prompt_ids(tok, p), ref) for (p, _), ref in zip(probes, refs)]
    else:
        rows = [pair_ids(tok, p, a) for p, a in probes]
    return [_score(pred, ref, protocol) for pred, ref in zip(argmax_tokens(editor, rows), refs)]


def true_objects(requests: list[EditRequest]) -> list[str]:
    """Each request's original object (`meta["true_object"]`), which `prob_preference` compares against."""
    out = []
    for i, r in enumerate(requests):
        obj = r.meta.get("true_object")
        if not isinstance(obj, str) or not obj.strip():
            raise ValueError(
                f"prob_preference needs the true object: request {i} ({r.prompt!r} -> {r.target!r}) has no "
                "non-empty meta['true_object']"
            )
        out.append(normalize_target(obj))
    return out


def prefers(editor, rows: list[tuple[str, str, str]], batch_size: int = 64) -> list[float]:
    """1.0 where (prompt, a, b) has mean log P(a | prompt) > mean log P(b | prompt), from batched forwards."""
    nll = target_nll(editor, [(p, a) for p, a, _ in rows] + [(p, b) for p, _, b in rows], batch_size)
    return [float(na < nb) for na, nb in zip(nll[: len(rows)], nll[len(rows) :])]


def _preference_scores(
    editor, requests: list[EditRequest], gen_pairs: list, loc_pairs: list
) -> tuple[list[float], list[float], list[float]]:
    """Reliability, generalization and locality under `prob_preference`, in one batched pass."""
    true = true_objects(requests)
    rows = [(r.prompt, r.target, t) for r, t in zip(requests, true)]
    rows += [(p, requests[i].target, true[i]) for i, (p, _) in gen_pairs]
    rows += [(p, a, requests[i].target) for i, (p, a) in loc_pairs]
    s = prefers(editor, rows)
    n, g = len(requests), len(gen_pairs)
    return s[:n], s[n : n + g], s[n + g :]


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: weighted mean of the 2- and 3-gram entropies (bits) of the words."""
    words = text.split()
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        ent = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * ent
    return total / len(ns)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate(
    editor,
    requests: list[EditRequest],
    protocol: str = "teacher_forced_token_acc",
    *,
    fluency: bool = False,
    fluency_tokens: int = 32,
    perplexity: bool = False,
) -> dict[str, Any]:
    """Score requests on the editor's current model; every number is tagged with its protocol."""
    check_protocol(protocol)
    requests = list(requests)
    if not all(isinstance(r, EditRequest) for r in requests):
        raise TypeError("evaluate expects a list of EditRequest")
    gen_pairs = [(i, (p, r.target)) for i, r in enumerate(requests) for p in r.rephrases]
    loc_pairs = [(i, pr) for i, r in enumerate(requests) for pr in r.locality]
    port_pairs = [(i, pr) for i, r in enumerate(requests) for pr in r.portability]
    if protocol == "prob_preference":
        rel, gen, loc = _preference_scores(editor, requests, gen_pairs, loc_pairs)
        port_pairs, port = [], []
    else:
        rel = score_pairs(editor, [(r.prompt, r.target) for r in requests], protocol)
        gen = score_pairs(editor, [p for _, p in gen_pairs], protocol) if gen_pairs else []
        loc = score_locality(editor, [p for _, p in loc_pairs], protocol) if loc_pairs else []
        port = score_pairs(editor, [p for _, p in port_pairs], protocol) if port_pairs else []

    records: list[dict[str, Any]] = [
        {"prompt": r.prompt, "target": r.target, "reliability": s} for r, s in zip(requests, rel)
    ]
    for name, idx, scores in (
        ("generalization", gen_pairs, gen),
        ("locality", loc_pairs, loc),
        ("portability", port_pairs, port),
    ):
        per: dict[int, list[float]] = {}
        for (i, _), s in zip(idx, scores):
            per.setdefault(i, []).append(s)
        for i, rec in enumerate(records):
            rec[name] = _mean(per.get(i, []))
    protocols = {k: protocol for k in ("reliability", "generalization", "locality", "portability")}
    report: dict[str, Any] = {
        "protocol": protocol,
        "n": len(requests),
        "reliability": _mean(rel),
        "generalization": _mean([r["generalization"] for r in records if r["generalization"] is not None]),
        "locality": _mean([r["locality"] for r in records if r["locality"] is not None]),
        "portability": _mean([r["portability"] for r in records if r["portability"] is not None]),
        "protocols": protocols,
        "records": records,
    }
    if perplexity and requests:
        nll = target_nll(editor, [(r.prompt, r.target) for r in requests])
        for rec, x in zip(records, nll):
            rec["perplexity"] = math.exp(x)
        report["perplexity"] = math.exp(sum(nll) / len(nll))
        protocols["perplexity"] = PERPLEXITY_PROTOCOL
    if fluency and requests:
        texts = editor.generate([r.prompt for r in requests], max_new_tokens=fluency_tokens)
        for rec, text in zip(records, texts):
            rec["fluency"] = ngram_entropy(text)
        report["fluency"] = _mean([rec["fluency"] for rec in records])
        protocols["fluency"] = FLUENCY_PROTOCOL
    return report
