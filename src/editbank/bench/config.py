"""What a bench run is: its parameters (the identity of the run directory); the per-method world presets and batch
sizes live on the method classes (`Method.world_preset`, `Method.bench_batch`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..evaluate.metrics import check_protocol


class BenchError(ValueError):
    """A bench run cannot start or resume (bad parameters, or a run directory holding another run)."""


@dataclass
class BenchConfig:
    methods: list[str]
    # "world", "world:SIZE" or "FORMAT:PATH" (any format load_requests reads); "suite" (the held-out test worlds) or
    # a comma-separated list of those runs each part into its own subdirectory
    data: str = "world"
    edits: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    seeds: list[int] = field(default_factory=lambda: [0])
    protocol: str = "greedy_exact_match"
    batch: int | None = None  # requests per editor call (None: per method, its class's bench_batch)
    undo_fraction: float = 0.0
    undo_methods: list[str] | None = None  # the methods the rollback runs for (None: all)
    eval_every: int = 0  # the periodic schedule: every this many edits, score every edit so far (0: off)
    model: str | None = None  # the model to edit for dataset data (default: the world's own model)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method, over the presets
    presets: bool = True

    def __post_init__(self) -> None:
        from ..methods import METHODS

        if not self.methods:
            raise BenchError("name at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise BenchError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise BenchError(f"a method is named twice in {self.methods}")
        if not self.edits or any(not isinstance(t, int) or t < 1 for t in self.edits):
            raise BenchError(f"edits must be positive integers, got {self.edits}")
        self.edits = sorted(set(self.edits))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BenchError(f"seeds must be distinct integers, got {self.seeds}")
        try:
            check_protocol(self.protocol)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if self.batch is not None and self.batch < 1:
            raise BenchError(f"batch must be >= 1, got {self.batch}")
        if not 0 <= self.undo_fraction <= 1:
            raise BenchError(f"undo_fraction must be in [0, 1], got {self.undo_fraction}")
        if self.eval_every < 0:
            raise BenchError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.protocol == "prob_preference" and self.eval_every:
            raise BenchError("the periodic schedule (eval_every) scores bare pairs: use another protocol")
        if self.undo_methods is not None and (bad := [m for m in self.undo_methods if m not in self.methods]):
            raise BenchError(f"undo_methods {bad} are not among the methods {self.methods}")
        stray = [m for m in self.hparams if m not in self.methods]
        if stray:
            raise BenchError(f"hyperparameters given for {stray}, which is not among the methods {self.methods}")
        for part in self.parts:
            kind, _, rest = part.partition(":")
            if kind != "world" and not rest:
                raise BenchError(f"data must be 'world', 'world:SIZE', 'FORMAT:PATH', 'suite' or a comma-separated "
                                 f"list of them, got {part!r}")
        from .run import part_name

        names = [part_name(p) for p in self.parts]
        if len(set(self.parts)) != len(self.parts) or len(set(names)) != len(names):
            raise BenchError(f"a data part is named twice in {self.data!r} (parts {names} each get a directory)")

    @property
    def parts(self) -> list[str]:
        """The data this run covers: 'suite' is every held-out test world; a comma-separated list, each item."""
        from ..world.test_specs import SUITE

        out: list[str] = []
        for item in (x.strip() for x in self.data.split(",") if x.strip()):
            out += [f"world:{name}" for name in SUITE] if item == "suite" else [item]
        return out

    @property
    def world_size(self) -> str | None:
        if len(self.parts) != 1:
            return None
        kind, _, rest = self.parts[0].partition(":")
        return (rest or "default") if kind == "world" else None

    @property
    def edits_a_world(self) -> bool:
        """True when the model edited is one of our built worlds: a built-in world, or a dataset's own world (dataset
        data without --model). The world presets apply there, and only there."""
        if len(self.parts) != 1:
            return False
        return self.world_size is not None or self.model is None

    def method_hparams(self, method: str) -> dict[str, Any]:
        """The method's class `world_preset` on our built worlds (unless presets=False), then this run's own."""
        from ..methods.base import get_method

        base = dict(get_method(method).world_preset) if self.presets and self.edits_a_world else {}
        return {**base, **self.hparams.get(method, {})}

    def method_batch(self, method: str) -> int:
        """Requests per editor call: --batch, else the method class's `bench_batch`."""
        from ..methods.base import get_method

        return self.batch or get_method(method).bench_batch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if len(self.parts) == 1:
            d["resolved"] = {m: {"hparams": self.method_hparams(m), "batch": self.method_batch(m)}
                             for m in self.methods}
        return d
