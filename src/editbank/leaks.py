"""Leak checks: nothing a method calibrates or learns from may be a prompt the run evaluates.

An *evaluation prompt* is a rephrase, locality probe or portability prompt of a request in the run. The texts a
method derives state from, other than each request's own prompt and target, are its *corpus* (SoLA's alpha and
whitening, WISE/REPAIR's prefixes and margin negatives, the locate methods' key statistics and context prefixes).
The two sets must be disjoint; prompts compare with surrounding whitespace stripped (they tokenize alike).

For a world, the split is by subject (`World.calibration_subjects`); for dataset records, `calibration_split`
holds a slice of the records out of the run and `calibration_corpus` takes the corpus from that slice only.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable

from .requests import EditRequest

CALIBRATION_SHARE = 0.1  # the share of dataset records held out of every run as its calibration slice


class LeakError(ValueError):
    """A run's corpus shares prompts with its evaluation prompts."""


class LeakWarning(UserWarning):
    """A prompt scored as a rephrase or probe is in the method's corpus."""


def evaluation_prompts(requests: Iterable[EditRequest]) -> set[str]:
    """Every rephrase, locality and portability prompt of `requests` (stripped)."""
    out: set[str] = set()
    for r in requests:
        out.update(p.strip() for p in r.rephrases)
        out.update(p.strip() for p, _ in r.locality)
        out.update(p.strip() for p, _ in r.portability)
    return out


def find_leaks(corpus: Iterable[str] | None, requests: Iterable[EditRequest]) -> list[str]:
    """The corpus texts that are evaluation prompts of `requests`, sorted."""
    if not corpus:
        return []
    evaluated = evaluation_prompts(requests)
    return sorted({c.strip() for c in corpus} & evaluated)


def describe(leaks: list[str], corpus_size: int, what: str = "the corpus") -> str:
    shown = "; ".join(repr(p) for p in leaks[:3]) + (f" and {len(leaks) - 3} more" if len(leaks) > 3 else "")
    return (f"{len(leaks)} of the {corpus_size} texts of {what} are evaluation prompts of the run (rephrases, "
            f"locality or portability probes): {shown}")


def check_disjoint(corpus: list[str] | None, requests: Iterable[EditRequest], what: str = "the corpus") -> None:
    """Raise LeakError naming the overlap when `corpus` holds an evaluation prompt of `requests`."""
    leaks = find_leaks(corpus, requests)
    if leaks:
        raise LeakError(describe(leaks, len(corpus or []), what))


def warn_leaks(corpus: list[str] | None, requests: Iterable[EditRequest]) -> list[str]:
    """Warn (LeakWarning) when `corpus` holds an evaluation prompt of `requests`; returns the overlap."""
    leaks = find_leaks(corpus, requests)
    if leaks:
        warnings.warn(describe(leaks, len(corpus or []), "the method's corpus") + "; those scores are measured on "
                      "data the method calibrated on", LeakWarning, stacklevel=3)
    return leaks


def calibration_split(requests: list[EditRequest], share: float = CALIBRATION_SHARE,
                      seed: str = "calibration") -> tuple[list[EditRequest], list[EditRequest]]:
    """(calibration, evaluation): a seeded `share` of the records (at least 1 when there are 2 or more) held out of
    every run, and the rest in their order. The same file always splits the same way."""
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1), got {share}")
    n = len(requests)
    k = min(n - 1, max(1, round(n * share))) if n >= 2 and share > 0 else 0
    held = set(random.Random(seed).sample(range(n), k))
    return [r for i, r in enumerate(requests) if i in held], [r for i, r in enumerate(requests) if i not in held]


def _evaluated(evaluation: list[EditRequest]) -> set[str]:
    """Every prompt of the evaluated records, their own edit prompts too (stripped): none may calibrate."""
    return evaluation_prompts(evaluation) | {r.prompt.strip() for r in evaluation}


def calibration_corpus(calibration: list[EditRequest], evaluation: list[EditRequest]) -> list[str]:
    """The corpus of a dataset run: the prompts, rephrases and probes of the held-out records, less every prompt
    of the evaluated records (their own prompts too: a corpus prompt must not be an edit either)."""
    banned = _evaluated(evaluation)
    out: dict[str, None] = {}
    for r in calibration:
        for p in (r.prompt, *r.rephrases, *(q for q, _ in r.locality)):
            if p.strip() not in banned:
                out.setdefault(p, None)
    return list(out)


def calibration_paraphrases(calibration: list[EditRequest], evaluation: list[EditRequest]) -> list[list[str]]:
    """Paraphrase groups of a dataset run: each held-out record's prompt and rephrases (one fact worded several
    ways), less every prompt of the evaluated records; groups left with fewer than two texts are dropped."""
    return [group for _, group in _paraphrase_groups(calibration, evaluation)]


def calibration_paraphrase_subjects(calibration: list[EditRequest], evaluation: list[EditRequest]) -> list[str | None]:
    """The subject of each group `calibration_paraphrases` gives (the record's; None where it names none)."""
    return [subject for subject, _ in _paraphrase_groups(calibration, evaluation)]


def _paraphrase_groups(calibration: list[EditRequest], evaluation: list[EditRequest]):
    banned = _evaluated(evaluation)
    for r in calibration:
        group = list(dict.fromkeys(p for p in (r.prompt, *r.rephrases) if p.strip() not in banned))
        if len(group) >= 2:
            yield r.subject, group
