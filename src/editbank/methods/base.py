"""The Method protocol, hyperparameter validation and the method registry.

A method owns its state as attributes (never module globals). The editor drives it:
`apply` writes a batch of requests, `remove` tries an exact undo, `reset` returns to the unedited
state (for snapshot-and-replay undo), `state_dict`/`load_state_dict` persist it through the store.
Methods that change model weights name them in `touched_parameters`; the editor snapshots and
restores those weights itself.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..models.hooks import frozen_prefix
from ..requests import EditRequest

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method available as `Editor.open(..., method=name)`."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    key = name.strip().lower()  # "SoLA" and "sola" are one method
    if key not in METHODS:
        import difflib

        near = difflib.get_close_matches(key, METHODS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(f"unknown method {name!r}; {hint}available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def stable_seed(*parts: Any) -> int:
    """A seed from values (a request's text, a hyperparameter seed), never from edit ids: a fresh editor given the
    same requests in another order or with other ids draws the same numbers for each."""
    import zlib

    return zlib.crc32("\x1f".join(map(str, parts)).encode())


class EditFailed(RuntimeError):
    """A method could not write an edit (non-finite loss, bad state); nothing was changed."""


class ExportError(ValueError):
    """The edited model cannot be written in the format asked for (its edits would be lost)."""


class EditNotWritten(EditFailed):
    """The method ran, but the model does not answer a request's target afterwards; the edit was rolled back.

    `failures` holds one dict per request that did not take: prompt, target, the method's final loss and what
    the model answered instead."""

    def __init__(self, message: str, failures: list[dict[str, Any]]):
        super().__init__(message)
        self.failures = failures


@dataclass
class EditItem:
    """One request as the method sees it: the store's edit id plus the request."""

    id: int
    request: EditRequest


@dataclass
class Route:
    """Per-forward routing context: where each row's prompt ends, and decisions kept for generation.

    `query_index[b]` is the last prompt token of row b, `query_start[b]` its first (None: position 0; a
    left-padded batch starts later). In generation the decision taken on the prompt (the first forward) is
    stored in `decisions` and reused for every generated token.
    """

    query_index: torch.Tensor | None = None
    query_start: torch.Tensor | None = None
    keep_decisions: bool = False
    decisions: dict[str, Any] = dataclasses.field(default_factory=dict)

    def reuse(self, key: str, length: int, compute: Callable[[], Any],
              advance: Callable[[Any], Any] | None = None) -> Any:
        """The routing decision of this forward under `key`: `compute()`'s, kept when `keep_decisions`; a
        one-token forward after it (a generated token) reuses the kept one instead, through `advance` where the
        decision moves with each token (it returns the decision for this token, which is kept for the next)."""
        if self.keep_decisions and length == 1 and key in self.decisions:
            decision = self.decisions[key]
            if advance is not None:
                decision = self.decisions[key] = advance(decision)
            return decision
        decision = compute()
        if self.keep_decisions:
            self.decisions[key] = decision
        return decision


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def build_hparams(cls: type, overrides: dict[str, Any]) -> Any:
    """Make a hyperparameter dataclass, naming any unknown or mistyped field in the error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    for k, v in overrides.items():
        if not _type_ok(v, hints[k]):
            raise TypeError(f"hyperparameter {k!r} must be {hints[k]}, got {v!r} ({type(v).__name__})")
    hp = cls(**overrides)
    if hasattr(hp, "validate"):
        hp.validate()
    return hp


class Checked:
    """Base of the hyperparameter dataclasses: `checks` maps a field to its rule, a tuple of the allowed values or
    a range (">= 1", "> 0", "(0, 1]", "[0, 1]", ...); `validate()` raises ValueError naming the first field outside
    its rule (rules are merged over the class's bases; None passes, where a field takes it). A class with rules
    across fields overrides `validate`, calls `super().validate()` first and adds them."""

    checks: ClassVar[dict[str, tuple | str]] = {}

    def validate(self) -> None:
        rules: dict[str, tuple | str] = {}
        for c in reversed(type(self).__mro__):
            rules.update(vars(c).get("checks", {}))
        for name, rule in rules.items():
            value = getattr(self, name)
            if value is not None and not _within(value, rule):
                want = "one of " + ", ".join(map(repr, rule)) if isinstance(rule, tuple) else rule
                raise ValueError(f"{type(self).__name__}.{name} must be {want}, got {value!r}")


def _within(value: Any, rule: tuple | str) -> bool:
    if isinstance(rule, tuple):
        return value in rule
    if rule[0] in "([":  # an interval; NaN is in none
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (lo <= value if rule[0] == "[" else lo < value) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return {">=": value >= float(bound), ">": value > float(bound)}[op]


class PerThread(threading.local):
    """A method's per-forward switches, one set per thread: a thread that trains an edit (its override on)
    and a thread that serves completions (routing on) can run forwards through the same hooks at once."""

    route: Route | None = None
    enabled: bool = True
    pending: dict | None = None  # the locate methods' private weights while computing beside readers


class Method:
    """Base class of every editing method."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type]
    needs_subject: ClassVar[bool] = False
    # store periodic snapshots for snapshot-and-replay undo; methods whose undo is (almost) always exact
    # turn this off and fall back to replaying from the base model (REPAIR: a property of its undo mode)
    snapshots: ClassVar[bool] = True
    # True: the state is the held edits' artifacts (written once, with each edit) plus the small index that
    # `state_dict` returns, rather than the whole state rewritten after every edit; the editor then hands the
    # held edits' artifacts to `load_artifacts` after `load_state_dict` (and never snapshots)
    state_in_artifacts: ClassVar[bool] = False
    # hyperparameters that shape no written state (how the next undo is done, say): a reopened store may change
    # them, and the new values are recorded; every other hyperparameter is fixed when the store is created
    reopen_hparams: ClassVar[frozenset[str]] = frozenset()
    # `editbank bench` on our built worlds (a built-in world or a dataset's own world): hyperparameters over the
    # defaults, chosen on the dev world only (recorded in params.json; `BenchConfig(presets=False)` drops them)
    world_preset: ClassVar[dict[str, Any]] = {}
    bench_batch: ClassVar[int] = 1  # requests per editor call in `editbank bench` (its --batch overrides)
    # EasyEdit YAML keys -> our hyperparameters (`methods.easyedit`; None: keys taken as they are) and the EasyEdit
    # alg_names whose files this method reads
    easyedit_rules: ClassVar[dict[str, Any] | None] = None
    easyedit_names: ClassVar[tuple[str, ...]] = ()
    # values for hyperparameters a store made before they existed does not record: what that store's edits were
    # made with (a new default must not reinterpret an old store's state)
    stored_defaults: ClassVar[dict[str, Any]] = {}
    # hyperparameters removed from the class, with the one value a store made before may hold (dropped on load)
    retired_hparams: ClassVar[dict[str, Any]] = {}
    # True: every edit lives in the weights `touched_parameters` names, so the edited model's own
    # `save_pretrained` checkpoint holds them (FT-L, the locate family); False: edits live in routed side state
    # (adapters, codebooks, side memories) that a plain checkpoint cannot hold
    edits_in_weights: ClassVar[bool] = False
    # True: `pretrain` does an edit's heavy work (training against the frozen base, or a closed-form update
    # computed on private copies of the weights it writes) without changing the method or what other threads'
    # forwards see; `apply` then only installs the result (a server computes edits without stalling readers).
    # False: the whole edit needs the model to itself (it trains in place)
    trains_beside_readers: ClassVar[bool] = False

    def __init__(self, model, tokenizer, arch, hparams) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.hparams = hparams
        self.thread = PerThread()
        # prompts typical of the model's domain, about distinct facts, for methods that calibrate on them
        # (set by the editor; not persisted: what a method derives from them goes into its state)
        self.corpus: list[str] | None = None
        # texts the key statistics of the locate methods are taken from (None: the corpus); set by the editor
        self.stats_corpus: list[str] | None = None
        # groups of prompts, each one fact worded several ways, none evaluated (SoLA's key whitening); set by the editor
        self.paraphrases: list[list[str]] | None = None
        # the subject of each paraphrase group (None where unknown), aligned with `paraphrases`; set by the editor
        self.paraphrase_subjects: list[str | None] | None = None
        # an edit's request by id, from the store (set by the editor): state refers to edits by id, never re-saves
        # what the store holds
        self.request_of: Callable[[int], EditRequest] | None = None
        self._pretrained: dict = {}  # what `pretrain` computed, for the `apply` inside `pretrained(...)`

    def frozen_below(self, layer: int):
        """Around a training loop that feeds one batch at every step and changes nothing below decoder layer
        `layer`: the layers below it run on the first step only (`models.hooks.frozen_prefix`; bitwise the same
        numbers, fewer forwards)."""
        return frozen_prefix(self.model, [self.arch.layer(i) for i in range(layer)])

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install whatever persistent hooks the method needs on the model."""

    def prepare(self) -> None:
        """Do now the one-time work the first edit would do (calibration, key statistics), so that a benchmark
        can time edits without it. Idempotent; the default does nothing."""

    def detach(self) -> None:
        """Remove every hook `attach` installed."""

    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        """Write the requests; return per-item stats (include a float 'loss')."""
        raise NotImplementedError

    def artifacts(self, edit_id: int) -> dict[str, torch.Tensor]:
        """Tensors that describe one edit (stored with it, for inspection and export)."""
        return {}

    def remove(self, edit_id: int) -> bool:
        """Undo one edit exactly if the method can; return False (changing nothing) if it cannot."""
        return False

    def undo_in_place(self, edit_id: int, edit_of: Callable[[int], Any],
                      artifacts: Callable[[int], dict[str, torch.Tensor]]
                      ) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None:
        """After `remove` returned False: an exact undo without a replay where the method can prove it, reading the
        held edits (`edit_of(id)`, store rows) and their stored artifacts. Returns, for each later edit it
        recomputed, its artifacts and the stats its recomputation gave (the editor stores both), or None, changing
        nothing: replay."""
        return None

    def replay_carry(self) -> Any:
        """Before an undo by replay (`remove` returned False): state that is not a function of the held edits
        (WISE's tombstones: a record of undos) and must survive the rebuild; handed to `replay_restore`."""
        return None

    def replay_restore(self, carry: Any, edit_id: int, request: EditRequest) -> None:
        """After the replay that undid `edit_id` (whose request was `request`): put `carry` back."""

    def replay_work(self, edits: list, artifacts: Callable[[int], dict[str, torch.Tensor]]) -> dict | None:
        """During an undo by replay, before a call of `edits` (store rows) is re-applied: what the call may take
        from their stored results instead of recomputing it, as `pretrain`'s work (inside `pretrained(...)`).
        Only results the method knows recomputing gives bitwise; `artifacts(edit_id)` reads an edit's. None: none."""
        return None

    def reset(self) -> None:
        """Forget every edit (method state only; the editor restores touched weights)."""

    def touched_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Model parameters this method writes into (snapshotted and restored by the editor)."""
        return {}

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if tensors or meta:
            raise ValueError(f"method {self.name!r} has no state to load")

    def load_artifacts(self, held: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> None:
        """Rebuild the edits' part of the state from (edit id, artifacts) in id order (`state_in_artifacts`)."""
        raise NotImplementedError(f"method {self.name!r} keeps its state in state_dict")

    def checkpoint(self) -> Any:
        """A copy of the state to `restore` if the edit or undo in progress fails."""
        tensors, meta = self.state_dict()
        return {k: v.detach().clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))

    def restore(self, checkpoint: Any) -> None:
        self.reset()
        self.load_state_dict(*checkpoint)

    def pretrain(self, requests: list[EditRequest]) -> dict | None:
        """The heavy work of editing `requests` (`trains_beside_readers`), done without changing the method or
        what other threads' forwards see: a dict `apply` takes its results from inside `pretrained(...)`, keyed
        as the method looks them up (`take_pretrained`). None: not possible now; `apply` computes everything."""
        return None

    @contextmanager
    def pretrained(self, work: dict | None) -> Iterator[None]:
        """Let the `apply` calls inside the block use `work` from `pretrain` (None: compute everything)."""
        previous, self._pretrained = self._pretrained, dict(work or {})
        try:
            yield
        finally:
            self._pretrained = previous

    def take_pretrained(self, key: Any) -> Any:
        """`pretrain`'s result under `key`, once (None: compute it now)."""
        return self._pretrained.pop(key, None)

    # -- routing and switching ------------------------------------------------------------------
    @property
    def route(self) -> Route | None:
        return self.thread.route

    @route.setter
    def route(self, value: Route | None) -> None:
        self.thread.route = value

    @property
    def enabled(self) -> bool:
        return self.thread.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.thread.enabled = value

    @contextmanager
    def routing(self, route: Route) -> Iterator[None]:
        """Make `route` the routing context of the forwards inside the block."""
        previous, self.route = self.route, route
        try:
            yield
        finally:
            self.route = previous

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the block with this method's hooks switched off (weights are the editor's job)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


def pick_layer(arch, layer: int | None) -> int:
    """A decoder layer from a hyperparameter (None: the architecture's upper-middle default), range-checked."""
    index = layer if layer is not None else arch.default_layers(1)[0]
    if not 0 <= index < arch.num_layers:
        raise ValueError(f"layer {index} out of range: the model has {arch.num_layers} layers")
    return index
