"""Edit requests: what a user asks a method to write into a model, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

Probe = tuple[str, str]


def _check_text(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"EditRequest.{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"EditRequest.{name} must not be empty or whitespace")
    return value


def _check_probes(name: str, value: Any) -> list[Probe]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"EditRequest.{name} must be a list of (prompt, answer) pairs")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = (item.get("prompt"), item.get("answer"))
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(f"EditRequest.{name}[{i}] must be a (prompt, answer) pair")
        p = _check_text(f"{name}[{i}].prompt", item[0]).rstrip()
        a = normalize_target(_check_text(f"{name}[{i}].answer", item[1]))
        out.append((p, a))
    return out


def normalize_target(target: str) -> str:
    """A target continues the prompt, so it starts with exactly one space (BPE word boundary)."""
    return " " + target.strip()


@dataclass
class EditRequest:
    """One fact correction: `prompt` should be completed by `target`.

    `rephrases` are other wordings (evaluation only unless a method is told to train on them),
    `locality` probes are (prompt, answer) pairs that must not change, `portability` probes test
    consequences of the edit. Prompts lose trailing whitespace and targets get one leading space.
    """

    prompt: str
    target: str
    subject: str | None = None
    rephrases: list[str] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt = _check_text("prompt", self.prompt).rstrip()
        self.target = normalize_target(_check_text("target", self.target))
        if self.subject is not None:
            self.subject = _check_text("subject", self.subject).strip()
            if self.subject not in self.prompt:
                raise ValueError(f"EditRequest.subject {self.subject!r} does not occur in the prompt")
        if isinstance(self.rephrases, str) or not isinstance(self.rephrases, (list, tuple)):
            raise TypeError("EditRequest.rephrases must be a list of str")
        self.rephrases = [_check_text(f"rephrases[{i}]", r).rstrip() for i, r in enumerate(self.rephrases)]
        self.locality = _check_probes("locality", self.locality)
        self.portability = _check_probes("portability", self.portability)
        if self.key is not None:
            _check_text("key", self.key)
        if not isinstance(self.meta, dict):
            raise TypeError("EditRequest.meta must be a dict")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"EditRequest.meta must be JSON-serialisable: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["locality"] = [list(p) for p in self.locality]
        d["portability"] = [list(p) for p in self.portability]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        if not isinstance(d, dict):
            raise TypeError(f"an edit request must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown EditRequest field(s): {sorted(unknown)}")
        return cls(**d)
