"""One training loop for every method that optimises (FT-L, SoLA, GRACE, WISE/REPAIR, the locate target).

Each step: compute the loss; a `monitor` (REPAIR's in-loop monitoring) sees it first and may adjust the
optimiser or end the loop (a divergence it detects, it handles itself by rolling back); otherwise a non-finite
loss raises `EditFailed` (the one divergence rule: nothing is written, the editor rolls the call back); a loss
that meets the stop rule ends the loop before stepping (the one stop rule: the returned loss is the last one
computed, `steps` counts the forwards); otherwise the learning-rate schedule is set for this step, gradients are
cleared, the loss is backpropagated, `before_step` may rewrite the gradients (a mask, a float32 master copy), the
optimiser steps and `after_step` may project the parameters (a clamp).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import EditFailed


@dataclass
class Fitted:
    loss: float  # the last loss computed (inf if no step ran)
    steps: int  # forwards run (the stopping one included)


def cosine_lr(lr: float, n_iter: int) -> Callable[[int], float]:
    """Learning rate of step s (1-based) under a cosine decay from `lr` over n_iter steps."""
    return lambda s: lr * 0.5 * (1 + math.cos(math.pi * (s - 1) / n_iter))


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """"adam" or "sgd" over `params` at `lr`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def fit(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, n_iter: int, *, what: str,
        stop_loss: float | None = None, done: Callable[[float], bool] | None = None,
        lr: Callable[[int], float] | None = None, before_step: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None,
        monitor: Callable[[int, float, torch.optim.Optimizer], bool] | None = None) -> Fitted:
    """Run at most n_iter steps of `opt` on `loss_fn()`; stop once the loss is below `stop_loss` (or `done(loss)`
    says so). `what` names the training in the divergence error."""
    loss_value, steps = float("inf"), 0
    for steps in range(1, n_iter + 1):
        loss = loss_fn()
        loss_value = float(loss.detach())
        if monitor is not None and monitor(steps, loss_value, opt):
            break
        if not math.isfinite(loss_value):
            raise EditFailed(f"{what} diverged: loss is {loss_value} at step {steps}")
        if (stop_loss is not None and loss_value < stop_loss) or (done is not None and done(loss_value)):
            break
        if lr is not None:
            rate = lr(steps)
            for group in opt.param_groups:
                group["lr"] = rate
        opt.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        if after_step is not None:
            after_step()
    return Fitted(loss_value, steps)
