"""EasyEdit hyperparameter YAML files (as dicts) translated into editbank hyperparameters.

Each method class names its rules (`Method.easyedit_rules`, `Method.easyedit_names`: the EasyEdit alg_names it
reads); they map each EasyEdit key to a rule: the editbank hyperparameter it sets (identity where the
names agree), the values editbank honours (anything else is an error naming key and value), or why the key is
dropped (run settings such as `alg_name`/`device`, and details editbank fixes itself). A method's own field names are
accepted too; a key that is neither is an error naming it and listing the known ones. Like EasyEdit, top-level
strings in scientific notation (`v_lr: 5e-1`, which YAML reads as a string) become numbers.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from typing import Any

# a rule takes (key, value) and returns (our hyperparameters it sets, why it was dropped or None); ValueError: unusable
Rule = Callable[[str, Any], tuple[dict[str, Any], str | None]]

RUN_SETTING = "EasyEdit run settings (editbank takes the model, device and modules from the command line and the model)"
RUN_SETTINGS = ("alg_name", "model_name", "tokenizer_name", "device", "stats_dir", "model_parallel", "batch_size",
                "max_length", "fp16", "bf16", "exp", "results_dir", "use_chat_template", "rewrite_module_tmp",
                "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "mom2_dtype")

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def to(field: str) -> Rule:
    """The key sets our hyperparameter `field` to its value."""
    return lambda key, value: ({field: value}, None)


def drop(reason: str) -> Rule:
    """The key is dropped (any value), with `reason` shown to the user."""
    return lambda key, value: ({}, reason)


def choice(allowed: dict[Any, dict[str, Any]], why: str = "") -> Rule:
    """Only the values in `allowed` are honoured (each sets the given hyperparameters); any other is an error."""
    def rule(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
        for ok, sets in allowed.items():
            if value == ok and type(value) is type(ok):
                return dict(sets), None
        raise ValueError(f"EasyEdit {key}: {value!r} is not supported by editbank (supported: "
                         f"{', '.join(repr(v) for v in allowed)}){f'; {why}' if why else ''}")
    return rule


def inner_params(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
    """`inner_params: [model.layers[27].mlp.down_proj.weight]` -> layer 27 (the MLP output projection only)."""
    paths = [str(p) for p in (value if isinstance(value, list) else [value])]
    layers = set()
    for p in paths:
        found = re.search(r"\[(\d+)\]|\.(\d+)\.", p)
        if not found:
            raise ValueError(f"EasyEdit {key}: {p!r} has no layer index in it")
        if re.search(r"attn|attention", p):
            raise ValueError(f"EasyEdit {key}: {value!r} is not supported by editbank (it edits the MLP output "
                             "projection of one layer)")
        layers.add(int(found.group(1) or found.group(2)))
    if len(layers) != 1:
        raise ValueError(f"EasyEdit {key}: {value!r} is not supported by editbank (one layer, got {sorted(layers)})")
    return {"layer": layers.pop()}, None


def mom2_dataset(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
    """EasyEdit's dataset names mean nothing offline: the corpus (the world's, or --corpus) is used; a path is kept."""
    if isinstance(value, str) and value.lower() in ("wikipedia", "wikitext", "wiki"):
        return {}, "EasyEdit's statistics dataset: editbank estimates them on the corpus (the world's or --corpus)"
    return {"mom2_dataset": value}, None


def nullspace_threshold(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
    """EasyEdit's threshold is absolute (eigenvalues of C below it span the null space)."""
    return {"nullspace_threshold": value, "nullspace_relative": False}, None


def dropout(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
    if value in (0, None):
        return {}, None
    raise ValueError(f"EasyEdit {key}: {value!r} is not supported by editbank (only 0)")


def _number(value: Any) -> Any:
    """`"5e-1"` -> 0.5 (YAML 1.1 reads scientific notation without a dot as a string; EasyEdit converts it)."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def translate(method: str, cfg: dict[str, Any], known: set[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(our hyperparameters, {dropped key: why}) from an EasyEdit YAML (as a dict) for `method`.

    `known` is the method's own field names (default: its Hparams fields); a method without rules takes the keys
    as they are."""
    from .base import get_method

    if not isinstance(cfg, dict):
        raise ValueError(f"expected a mapping of hyperparameters, got {type(cfg).__name__}")
    hparams_cls = get_method(method).Hparams
    if known is None:
        known = {f.name for f in dataclasses.fields(hparams_cls)}
    rules = get_method(method).easyedit_rules
    if rules is None:
        return dict(cfg), {}
    alg = cfg.get("alg_name")
    if alg is not None and str(alg).lower() not in get_method(method).easyedit_names:
        raise ValueError(f"EasyEdit alg_name {alg!r} does not match method {method!r}")
    translated: dict[str, Any] = {}
    own: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for key, value in cfg.items():
        value = _number(value)
        if key in rules:
            sets, why = rules[key](key, value)
            translated.update(sets)
            if why is not None:
                dropped[key] = why
        elif key in known:
            own[key] = value
        elif key in RUN_SETTINGS:
            dropped[key] = RUN_SETTING
        else:
            raise ValueError(f"unknown {method.upper()} hyperparameter {key!r} in the EasyEdit config; known: "
                             f"{sorted(set(rules) | known | set(RUN_SETTINGS))}")
    out = {**translated, **own}  # the method's own names win over what an EasyEdit key implied
    hints = typing.get_type_hints(hparams_cls) if dataclasses.is_dataclass(hparams_cls) else {}
    for k, v in out.items():  # 1e5 for an int hyperparameter
        if hints.get(k) is int and isinstance(v, float) and v.is_integer():
            out[k] = int(v)
    return out, dropped
