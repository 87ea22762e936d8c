"""Context-managed tracing and patching of module inputs/outputs (baukit `nethook` style).

Every manager removes the hooks it registered when its block exits, also when the block raises, so a
failed edit never leaves a model with stray hooks. A hook acts only on the forwards of the thread that registered
it: an edit computed in one thread (tracing keys, patching a layer) never sees or changes the forwards other
threads run through the same model meanwhile (a server's completions).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PatchFn = Callable[[nn.Module, Any, Any], Any]


@dataclass
class Trace:
    """What one module saw on its latest call: first positional input and (first) output tensor."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _first_input(args: tuple, kwargs: dict) -> Any:
    """The first positional argument, else `hidden_states`/the first tensor keyword argument."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _first_output(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) and output else output


def _replace_first(output: Any, new: Any) -> Any:
    if isinstance(output, tuple) and output:
        return (new, *output[1:])
    if isinstance(output, list) and output:
        return [new, *output[1:]]
    return new


def _detach(x: Any, detach: bool) -> Any:
    return x.detach() if detach and isinstance(x, torch.Tensor) else x


@contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable]], *, with_kwargs: bool = False) -> Iterator[None]:
    """Register forward hooks for the duration of the block, acting on this thread's forwards only; always
    removes them on exit."""
    owner = threading.get_ident()

    def owned(fn: Callable) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs) if threading.get_ident() == owner else None

        return hook

    with ExitStack() as stack:
        for module, fn in hooks:
            stack.callback(module.register_forward_hook(owned(fn), with_kwargs=with_kwargs).remove)
        yield


@contextmanager
def trace(
    model: nn.Module, *paths: str, inputs: bool = True, outputs: bool = True, detach: bool = True
) -> Iterator[dict[str, Trace]]:
    """Record the input/output of each module at `paths` (dotted from the model root) during the block.

    A module called several times in the block (e.g. during generation) keeps its latest call.
    """
    traces = {p: Trace() for p in paths}

    def make_hook(t: Trace) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if inputs:
                t.input = _detach(_first_input(args, kwargs), detach)
            if outputs:
                t.output = _detach(_first_output(output), detach)

        return hook

    hooks = [(model.get_submodule(p), make_hook(traces[p])) for p in paths]
    with forward_hooks(hooks, with_kwargs=True):
        yield traces


@contextmanager
def patch(model: nn.Module, path: str, fn: PatchFn) -> Iterator[nn.Module]:
    """Replace the output of the module at `path` by `fn(module, input, output)` during the block.

    `fn` gets the first input and the first output tensor and returns the new output tensor, or None
    to keep it; for tuple outputs only the first element is replaced. Yields the patched module.
    """
    module = model.get_submodule(path)

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        new = fn(mod, _first_input(args, kwargs), _first_output(output))
        return None if new is None else _replace_first(output, new)

    with forward_hooks([(module, hook)], with_kwargs=True):
        yield module


def _same(a: Any, b: Any) -> bool:
    """Whether two forwards' inputs are equal: tensors by value, containers item by item, plain values by ==;
    any other object (a cache) never counts as equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return (a is None or isinstance(a, (bool, int, float, str))) and type(a) is type(b) and a == b


_PREFIX_LOCK = threading.Lock()  # wrapping and unwrapping layers' forward (two threads may enter at once)


def _hook_ids(layers: list[nn.Module]) -> tuple:
    """Which forward hooks sit on the layers and their submodules now (a trace added for one forward differs)."""
    return tuple((tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for layer in layers for m in layer.modules())


@contextmanager
def frozen_prefix(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, a forward of `model` (this thread's) whose inputs equal the previous one's, with the same
    hooks on `layers`, does not run `layers` (the decoder layers below the trained ones, in order) again: the last of
    them returns what it returned then. For training loops that feed one batch at every step and change nothing
    below the layer they train: the numbers are bitwise those of running the layers (they would compute exactly what
    they computed before). Every layer runs for a forward with other inputs or a cache object among them, one after
    a hook was added or removed inside `layers` (a trace of a layer below: it must fire), another thread's forward,
    and a call of the layers outside a forward of `model` (which also drops what was kept)."""
    owner = threading.get_ident()
    state: dict[str, Any] = {"inputs": None, "out": None, "reuse": False, "inside": False}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != owner:
            return
        key = ((args, kwargs), _hook_ids(layers))
        state["inside"] = True
        state["reuse"] = state["out"] is not None and _same(state["inputs"], key)
        if not state["reuse"]:  # kept as copies: a caller may write its tensors in place before the next step
            state["inputs"], state["out"] = _clone(key), None

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if threading.get_ident() == owner:
            state["reuse"] = state["inside"] = False

    def wrap(i: int, forward: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return forward(*args, **kwargs)
            if not state["inside"]:  # called on its own: what it computes is not this block's to keep
                state["out"] = None
                return forward(*args, **kwargs)
            if state["reuse"]:
                return _clone(state["out"])
            out = forward(*args, **kwargs)
            if i == len(layers) - 1:
                state["out"] = _clone(out)
            return out

        return run

    with _PREFIX_LOCK:  # nothing below, or already inside such a block (or wrapped by another library): as is
        free = bool(layers) and not any("forward" in vars(m) for m in layers)
        runs = [wrap(i, m.forward) for i, m in enumerate(layers)] if free else []
        for m, run in zip(layers, runs):
            m.forward = run
    if not runs:
        yield
        return
    try:
        with ExitStack() as stack:
            stack.callback(model.register_forward_pre_hook(before, with_kwargs=True).remove)
            stack.callback(model.register_forward_hook(after, with_kwargs=True, always_call=True).remove)
            yield
    finally:
        with _PREFIX_LOCK:
            for m, run in zip(layers, runs):
                if vars(m).get("forward") is run:
                    del vars(m)["forward"]


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x
