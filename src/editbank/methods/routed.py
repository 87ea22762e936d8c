"""The base of the routed methods (GRACE, SoLA, WISE, REPAIR): edits live in side state (a codebook, LoRAs, side
memories) that forward hooks apply row by row, leaving the model's weights alone.

The base owns what they share: declaring and attaching the forward hooks (`hook`, `attach`, `detach`), the
per-forward routing context (`Method.route`, and `decide`: a generated token reuses the decision taken on its
prompt), and the training override: inside `training(value)` the hooks apply the edit being trained (`trainee`)
to every row instead of routing, in this thread only, so a thread that trains beside serving threads never
changes what they see. A routed method supplies its bank: how it decides a row, what delta it applies, and how
it writes, removes and persists an edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..tokens import prompt_ids
from .base import Method
from .subject_gate import names, subject_forms


class Routed(Method):
    """A method whose edits are applied by forward hooks, routed per row."""

    def __init__(self, model, tokenizer, arch, hparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        self._hooks: list[tuple[torch.nn.Module, Callable]] = []
        self._handles: list[Any] = []
        self._subject_forms: dict[str, set[tuple[int, ...]]] = {}

    def hook(self, module: torch.nn.Module, fn: Callable) -> None:
        """Declare a forward hook that `attach` installs (declare them all in __init__)."""
        self._hooks.append((module, fn))

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(fn) for m, fn in self._hooks]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- the training override --------------------------------------------------------------------
    @property
    def trainee(self) -> Any:
        """The edit being trained in this thread (what `training` was given), or None: route as usual."""
        return getattr(self.thread, "trainee", None)

    @contextmanager
    def training(self, value: Any) -> Iterator[None]:
        """Inside the block this thread's forwards apply `value` (the edit in training) to every row."""
        previous, self.thread.trainee = self.trainee, value
        try:
            yield
        finally:
            self.thread.trainee = previous

    # -- routing ------------------------------------------------------------------------------------
    def subject_forms(self, subject: str) -> set[tuple[int, ...]]:
        """The subject's token sequences for a subject gate (`subject_gate.subject_forms`, with the forms after a
        mark unless the hyperparameters say `gate_marks=False`), tokenized once."""
        forms = self._subject_forms.get(subject)
        if forms is None:
            marks = getattr(self.hparams, "gate_marks", True)
            forms = self._subject_forms[subject] = subject_forms(self.tokenizer, subject, marks=marks)
        return forms

    def spelled_subject(self, req, stats: dict[str, Any]) -> str | None:
        """The request's subject if its prompt's own tokens contain the subject's (a tokenizer may spell it otherwise
        inside this prompt, mid-word for example), else None; with the subject gate on, a subject the prompt does not
        spell is said in `stats` (the edit is then not gated, rather than gated away from its own prompt)."""
        if req.subject is None:
            return None
        if names(prompt_ids(self.tokenizer, req.prompt), self.subject_forms(req.subject)):
            return req.subject
        if getattr(self.hparams, "gate", "none") == "subject":
            stats["gate"] = "off: the prompt's tokens do not contain the subject's"
        return None

    def decide(self, key: str, length: int, compute: Callable[[], Any],
               advance: Callable[[Any], Any] | None = None) -> Any:
        """This forward's routing decision under `key` (`Route.reuse`; without a routing context, computed)."""
        route = self.route
        return compute() if route is None else route.reuse(key, length, compute, advance)

    def query_index(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Each row's last prompt token in this forward: the routing context's, else the last position."""
        route = self.route
        if route is None or route.query_index is None:
            return torch.full((batch,), length - 1, device=device)
        return route.query_index.to(device)


def prompt_mean(x: torch.Tensor, qidx: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """[B, D] each row's x [B, T, D] averaged over its prompt's positions start..qidx (start None: 0), summed in
    float64 so that a row's mean does not depend on its padding; float64 (the caller casts)."""
    pos = torch.arange(x.shape[1], device=x.device)[None, :]
    first = torch.zeros_like(qidx) if start is None else start
    keep = (pos >= first[:, None].to(pos.device)) & (pos <= qidx[:, None].to(pos.device))
    total = (x.double() * keep[..., None]).sum(1)
    return total / keep.sum(1, keepdim=True)
