"""Seeded generation of a world's content: invented entity names and the facts about them."""

from __future__ import annotations

import random

from .spec import Fact, WorldSpec

_ONSETS = ["b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "f", "h", "p", "g",
           "th", "dr", "br", "kr", "st", "gr", "sh", "tr", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "a", "ia", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "sh", "nd", "rk", "st", "v"]


def invent_name(rng: random.Random) -> str:
    """A pronounceable invented name of 2-3 syllables, e.g. 'Korvadun'."""
    n = rng.choice((2, 2, 3))
    parts = []
    for i in range(n):
        onset = rng.choice(_ONSETS)
        coda = rng.choice(_CODAS) if i == n - 1 or rng.random() < 0.25 else ""
        parts.append(onset + rng.choice(_VOWELS) + coda)
    return "".join(parts).capitalize()


def invent_names(n: int, rng: random.Random, avoid: set[str] = frozenset()) -> list[str]:
    """`n` distinct invented names, none in `avoid` (case-insensitively) and none a prefix of another."""
    banned = {a.lower() for a in avoid}
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not invent {n} distinct names")
        name = invent_name(rng)
        low = name.lower()
        if len(name) < 4 or low in seen or low in banned or any(low.startswith(s) or s.startswith(low)
                                                                  for s in seen):
            continue
        seen.add(low)
        out.append(name)
    return out


def entities_of(spec: WorldSpec) -> list[str]:
    """The world's subjects: given, taken from explicit facts, or invented from the seed."""
    if spec.entities is not None:
        return list(spec.entities)
    if spec.facts is not None and spec.n_entities is None:
        return list(dict.fromkeys(f.subject for f in spec.facts))
    words: set[str] = set()
    for r in spec.relations:
        for text in [*r.objects, *r.templates, *r.reserved_templates]:
            words.update(w.removesuffix("'s").strip(".,?:;") for w in text.split())
    return invent_names(spec.n_entities or 0, random.Random(f"entities:{spec.seed}"), avoid=words)


def generate_facts(spec: WorldSpec, entities: list[str]) -> list[Fact]:
    """The world's facts: explicit ones, else `facts_per_subject` random relations per subject."""
    if spec.facts is not None:
        return list(spec.facts)
    rng = random.Random(f"facts:{spec.seed}")
    k = spec.facts_per_subject or min(4, len(spec.relations))
    decks: dict[str, list[str]] = {r.name: [] for r in spec.relations}
    facts: list[Fact] = []
    for subject in entities:
        for rel in rng.sample(spec.relations, k):
            deck = decks[rel.name]
            if not deck:
                deck.extend(rel.objects)
                rng.shuffle(deck)
            facts.append(Fact(subject, rel.name, deck.pop()))
    return facts
