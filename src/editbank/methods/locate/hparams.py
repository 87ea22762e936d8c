"""Hyperparameters of ROME, MEMIT, AlphaEdit and MetaKE (EasyEdit-like names), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import Checked


@dataclass
class LocateHparams(Checked):
    """Shared by the locate-then-edit methods: which layers, how the target is learned, which statistics.

    Defaults are tuned on the built-in worlds (2-4 layer Llama models); see docs/methods/locate.md."""

    layers: list[int] | None = None  # edited decoder layers, ascending (None: the method's default choice)
    # where keys are read and the target is written: "last" prompt token (the built-in worlds recall facts there;
    # reliability 0.9 vs 0.0 on the default world) or "subject_last" (the papers' choice for real models)
    fact_token: str = "last"
    v_lr: float = 0.5  # Adam learning rate of the target delta
    v_num_grad_steps: int = 25  # at most this many steps of target optimisation per edit
    v_weight_decay: float = 0.5  # weight decay on ‖δ‖² / ‖h‖² (target_norms="reference": ‖δ‖ / ‖h_ref‖²)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ clamp_norm_factor × ‖h‖ (target_norms="reference": × ‖h_ref‖)
    # "ours" (the built-in worlds' settings were chosen with it) or "reference": the decay and clamp as
    # kmeng01/rome, memit and AlphaEdit compute them, relative to h_ref = ROME's MLP output, MEMIT's residual at
    # the lookup position (set when an EasyEdit file is ported, so its values mean what they meant there)
    target_norms: str = "ours"
    kl_factor: float = 0.0625  # weight of the KL term on "{subject} is a"
    v_stop_loss: float = 5e-2  # stop early once every request's mean target NLL is below this
    n_prefixes: int = 0  # context prefixes the keys are averaged over and the target is learned on (plus none)
    prefix_words: int = 5  # words per prefix taken from the corpus
    mom2_n_samples: int = 10000  # corpus texts the key covariance is estimated from (at most)
    mom2_dataset: str | None = None  # a text file (one text per line) for the covariance; None: the corpus
    mom2_batch_size: int = 32  # texts per forward in the covariance pass
    max_undo_log: int = 16  # newest edits whose factors are kept for exact undo (older: snapshot and replay)

    checks: ClassVar[dict[str, tuple | str]] = {
        "fact_token": ("subject_last", "last"), "v_lr": "> 0", "v_num_grad_steps": ">= 1", "v_weight_decay": ">= 0",
        "clamp_norm_factor": "> 0", "target_norms": ("ours", "reference"), "kl_factor": ">= 0", "v_stop_loss": ">= 0",
        "n_prefixes": ">= 0", "prefix_words": ">= 1", "mom2_n_samples": ">= 1", "mom2_batch_size": ">= 1",
        "max_undo_log": ">= 1"}

    def validate(self) -> None:
        super().validate()
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one layer (or be None)")
            if sorted(set(self.layers)) != list(self.layers):
                raise ValueError(f"layers must be distinct and ascending, got {self.layers}")


@dataclass
class ROMEHparams(LocateHparams):
    """ROME: one layer (None: the upper-middle one), rank-one update with the key covariance."""

    mom2_adjustment: bool = True  # C^-1 k* in the update (False: C = I, EasyEdit's llama ROME files)

    def validate(self) -> None:
        super().validate()
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got layers={self.layers}")


@dataclass
class MEMITHparams(LocateHparams):
    """MEMIT: several layers (None: up to three upper-middle ones), covariance weight λ, sequential keys."""

    mom2_update_weight: float = 1.0  # λ in (λC + C_p + K Kᵀ); C is the mean E[k kᵀ]
    sequential: bool = True  # add earlier edits' keys Σ K_prev K_prevᵀ (C_p) to the system
    norm_control: float = 0.0  # > 0: each write also minimises μ‖W + ΔW − W0‖², μ = norm_control × tr(C)
    # "call": μ per write, whatever its size (the dev values were chosen for calls of 100); "key": × the write's
    # requests, so a stream edited one at a time is pulled back as much per edit as one edited in batches
    norm_per: str = "call"

    checks: ClassVar[dict[str, tuple | str]] = {"mom2_update_weight": "> 0", "norm_control": ">= 0",
                                                "norm_per": ("call", "key")}


@dataclass
class AlphaEditHparams(LocateHparams):
    """AlphaEdit: MEMIT's layers with updates projected on the null space of the preserved keys."""

    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the null space (relative, see rel)
    nullspace_relative: bool = True  # threshold is a fraction of C's largest eigenvalue (False: absolute)
    L2: float = 1.0  # ridge term of the solve
    norm_control: float = 0.0  # > 0: each write also minimises μ‖W + ΔW − W0‖², μ = norm_control × tr(C)
    # "call": μ per write, whatever its size (the dev values were chosen for calls of 100); "key": × the write's
    # requests, so a stream edited one at a time is pulled back as much per edit as one edited in batches
    norm_per: str = "call"

    checks: ClassVar[dict[str, tuple | str]] = {"nullspace_threshold": "> 0", "L2": "> 0", "norm_control": ">= 0",
                                                "norm_per": ("call", "key")}


@dataclass
class MetaKEHparams(AlphaEditHparams):
    """MetaKE: AlphaEdit's write with the target learned through the solver's transfer matrix."""

    max_plan_factor: float = 10.0  # ‖D‖ ≤ max_plan_factor × clamp_norm_factor × ‖h‖ (the plan may overshoot)
    # the solver the plan sees: "last" (the last edited layer's transfer) or "all" (every edited layer's share of
    # the write, chained as the multi-layer write spreads the residual; docs/methods/locate.md)
    proxy: str = "last"
    # with norm control: the plan also sees the write's pull towards W0 at its keys, −μ·(W − W0)·P·M⁻¹·q, which
    # does not depend on D (False: the plan ignores it and the write realises less than planned)
    plan_pull: bool = True

    checks: ClassVar[dict[str, tuple | str]] = {"max_plan_factor": ">= 1", "proxy": ("last", "all")}
