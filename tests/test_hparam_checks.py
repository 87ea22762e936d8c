"""Every method's hyperparameter rules (`checks` on its Hparams class): a value outside a rule is refused with an
error naming the class and the field, a value inside it is not, the defaults pass, and an editor given a bad value
is not built (the model keeps no hook)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from editbank import Editor
from editbank.methods.base import METHODS, build_hparams


def rules_of(cls: type) -> dict[str, tuple | str]:
    rules: dict[str, tuple | str] = {}
    for c in reversed(cls.__mro__):
        rules.update(vars(c).get("checks", {}))
    return rules


def values(rule: tuple | str, integer: bool) -> tuple[list, list]:
    """(values outside the rule, values inside it), of the field's type."""
    if isinstance(rule, tuple):
        return ["not-" + "-".join(map(str, rule))], list(rule)
    step = 1 if integer else 0.5
    extra = [] if integer else [math.nan]
    if rule[0] in "([":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        lo, hi = (int(lo), int(hi)) if integer else (lo, hi)
        outside = [lo if rule[0] == "(" else lo - step, hi if rule[-1] == ")" else hi + step]
        inside = [b for b, closed in ((lo, rule[0] == "["), (hi, rule[-1] == "]")) if closed] + [(lo + hi) / 2]
        return outside + extra, [v for v in inside if not integer or v == int(v)]
    op, bound = rule.split()
    b = int(float(bound)) if integer else float(bound)
    return [b if op == ">" else b - step, *extra], [b + step if op == ">" else b]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_rule_refuses_values_outside_it_and_takes_values_inside(name):
    cls = METHODS[name].Hparams
    rules = rules_of(cls)
    assert rules, f"{name} checks none of its hyperparameters"
    assert set(rules) <= {f.name for f in dataclasses.fields(cls)}, "a rule names no field"
    build_hparams(cls, {})  # the defaults pass
    hints = typing.get_type_hints(cls)
    for field, rule in rules.items():
        integer = hints[field] is int or int in typing.get_args(hints[field])
        outside, inside = values(rule, integer)
        for bad in outside:
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
                build_hparams(cls, {field: bad})
        for good in inside:
            try:
                build_hparams(cls, {field: good})
            except ValueError as err:  # a rule across fields may still refuse it, never this field's own rule
                assert f"{cls.__name__}.{field} must be" not in str(err), (field, good)


def test_an_editor_with_a_bad_hyperparameter_is_not_built_and_leaves_the_model_alone():
    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, bad in (("sola", {"lr": math.nan}), ("repair", {"decay_factor": 0.0}), ("grace", {"gate": "x"}),
                        ("memit", {"norm_per": "edit"}), ("ft", {"stop_loss": -1.0})):
        with pytest.raises(ValueError, match="must be"):
            Editor(model, tok, method=method, **bad)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), method
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
