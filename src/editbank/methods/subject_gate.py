"""SoLA's subject gate: an edit that names its subject routes only rows whose prompt contains that subject's tokens.

Why (docs/methods/sola.md, "The subject gate"): on the held-out worlds the key alone cannot tell a paraphrase of an
edited fact from an unrelated prompt under the same wording, so any alpha wide enough to route paraphrases also
routes unrelated prompts. Every paraphrase of a fact about a subject names the subject; an unrelated prompt about
another subject does not. The gate is lexical, on token ids: a subject is matched in the forms its tokenizer gives
it (alone, after a space and right after a mark such as "(": the forms it takes at the start of a prompt and inside
one), so a paraphrase that calls
the subject something else (an alias, another casing, a pronoun) is not routed to the edit. Edits without a subject
are not gated.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# marks a subject may follow without a space ("(Paris)", '"Paris"', "anti-Paris", a new line)
_MARKS = ("(", '"', "'", "-", "/", "\n")


def subject_forms(tokenizer, subject: str, marks: bool = True) -> set[tuple[int, ...]]:
    """The token sequences the subject takes in a prompt: tokenized alone (a prompt's start; SentencePiece's form
    inside a sentence too) and after a space (a byte-level BPE's form inside a sentence). `marks`: also right after
    a mark such as "(" or a quote, where SentencePiece spells the subject without its word-start marker; that form
    keeps the mark's last token in front, so it does not match the subject's pieces inside another word. A form
    after a mark that one of the others already is (a byte-level BPE's) is not added."""
    plain = set()
    for text in (subject, " " + subject):
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids:
            plain.add(ids)
    forms = set(plain)
    for mark in _MARKS if marks else ():
        head = tokenizer(mark, add_special_tokens=False)["input_ids"]
        ids = tokenizer(mark + subject, add_special_tokens=False)["input_ids"]
        rest = tuple(ids[len(head) :])
        if head and ids[: len(head)] == head and rest and rest not in plain:  # else merged, or spelled as before
            forms.add((head[-1], *rest))
    return forms


# what ends a sentence in a prompt's text: a key read with `key_span="sentence"` starts after the last of these
# before the subject's last mention
SENTENCE_ENDS = (". ", "? ", "! ", "\n")


def subject_sentence(text: str, subject: str) -> str | None:
    """The text from the start of the sentence that names the subject (its last mention) on, or None when that is
    the whole text (nothing before that sentence) or the text does not contain the subject."""
    at = text.rfind(subject)
    if at <= 0:
        return None
    start = max(text.rfind(e, 0, at) + len(e) if text.rfind(e, 0, at) >= 0 else 0 for e in SENTENCE_ENDS)
    rest = text[start:].lstrip()
    return rest if start > 0 and rest else None


def names(ids: list[int], forms: set[tuple[int, ...]]) -> bool:
    """Do the token ids contain one of the forms?"""
    return any(tuple(ids[i : i + len(f)]) == f for f in forms for i in range(len(ids) - len(f) + 1))


class SubjectGate:
    """Which gated slots each row may route to: those of the edits whose subject occurs in the row. Built from
    (slot, forms) pairs; immutable (rebuild it when the bank changes). Slots not in it are ungated (`gated` False);
    `ungated` is how many of the used ones are: none, and the search for ungated edits is skipped."""

    def __init__(self, slot_forms: dict[int, set[tuple[int, ...]]], high: int, device, ungated: int,
                 subjects: dict[int, str] | None = None) -> None:
        self.subjects = subjects or {}  # slot -> the subject's text (SoLA's sentence keys)
        self.index: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for slot, forms in slot_forms.items():
            for f in forms:
                self.index[f].append(slot)
        self.lengths = sorted({len(f) for f in self.index})
        self.gated = torch.zeros(high, dtype=torch.bool, device=device)
        if slot_forms:
            self.gated[list(slot_forms)] = True
        self.any_open = ungated > 0  # some held edit is not gated

    def candidates(self, rows: list[list[int]]) -> list[list[int]]:
        """Per row, the gated slots whose subject's tokens occur in it (each once, ascending)."""
        out = []
        for ids in rows:
            ids = tuple(ids)
            found = {s for n in self.lengths for i in range(len(ids) - n + 1)
                     for s in self.index.get(ids[i : i + n], ())}
            out.append(sorted(found))
        return out
