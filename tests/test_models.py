"""Registry, hooks, loading and fingerprint tests, table-driven over every tiny architecture."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from functools import cache
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_TYPES, tiny_model, tiny_tokenizer
from torch import nn
from transformers import PreTrainedTokenizerFast

from editbank.models import (
    Arch,
    arch_of,
    forward_hooks,
    frozen_prefix,
    load_model,
    model_fingerprint,
    patch,
    supported_types,
    trace,
)

PROMPTS = ["The capital of Arvelia is", "Kestrel was born in the north"]


@cache
def _model(model_type: str, seed: int = 0) -> nn.Module:
    """Shared read-only tiny model; tests that change weights build their own."""
    return tiny_model(model_type, len(tiny_tokenizer()), seed=seed)


def _inputs() -> dict[str, torch.Tensor]:
    return dict(tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_every_registered_type_has_a_tiny_model():
    assert sorted(TINY_TYPES) == supported_types()


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_registry_resolves_every_component(model_type):
    model = _model(model_type)
    arch = arch_of(model)
    spec = arch.spec
    assert arch.num_layers == 4
    for path in (spec.layers, spec.final_norm, spec.lm_head, spec.embed):
        assert isinstance(model.get_submodule(path), nn.Module), path
    assert arch.lm_head() is model.get_output_embeddings()
    assert arch.embed() is model.get_input_embeddings()
    hidden = arch.embed().weight.shape[1]
    for i in range(arch.num_layers):
        components = ["mlp_out", "attn_out"] + [f"mlp_in{k}" for k in range(len(spec.mlp_in))]
        for comp in components:
            assert hasattr(arch.module(arch.layer_path(i, comp)), "weight"), (i, comp)
        assert arch.out_features(arch.mlp_out(i)) == hidden
        assert arch.out_features(arch.attn_out(i)) == hidden
        assert all(arch.in_features(m) == hidden for m in arch.mlp_in(i))
    assert arch.layer_path(-1, "mlp_out") == f"{spec.layers}.3.{spec.mlp_out}"


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_weight_out_in_matches_forward(model_type):
    arch = arch_of(_model(model_type))
    mod = arch.mlp_out(1)
    w = arch.weight_out_in(mod)
    assert w.shape == (arch.out_features(mod), arch.in_features(mod))
    assert w.data_ptr() == mod.weight.data_ptr()  # a view, not a copy
    x = torch.randn(3, 5, arch.in_features(mod), generator=torch.Generator().manual_seed(0))
    expected = x @ w.T + (mod.bias if getattr(mod, "bias", None) is not None else 0)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_trace_captures_mlp_out_and_cleans_up(model_type):
    model = _model(model_type)
    arch = arch_of(model)
    (layer,) = arch.default_layers(1)
    path = arch.layer_path(layer, "mlp_out")
    mod = arch.mlp_out(layer)
    inputs = _inputs()
    with trace(model, path, arch.layer_path(layer, "")) as tr, torch.no_grad():
        model(**inputs)
    batch, seq = inputs["input_ids"].shape
    assert tr[path].input.shape == (batch, seq, arch.in_features(mod))
    assert tr[path].output.shape == (batch, seq, arch.out_features(mod))
    assert tr[f"{arch.spec.layers}.{layer}"].output.shape == (batch, seq, arch.out_features(mod))
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), trace(model, path):
        assert mod._forward_hooks
        raise RuntimeError("boom")
    assert _no_hooks(model)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_patch_changes_logits_and_restores_exactly(model_type):
    model = _model(model_type)
    arch = arch_of(model)
    path = arch.layer_path(arch.default_layers(1)[0], "mlp_out")
    before = _logits(model)
    with patch(model, path, lambda mod, x, out: out + 1.0):
        patched = _logits(model)
    assert not torch.allclose(before, patched)
    assert torch.equal(_logits(model), before)
    with pytest.raises(ValueError), patch(model, path, lambda mod, x, out: None):
        assert torch.equal(_logits(model), before)  # None keeps the output
        raise ValueError
    assert _no_hooks(model)


def test_patch_and_trace_handle_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    root = nn.Sequential()
    root.add_module("pair", Pair())
    x = torch.ones(2)
    with trace(root, "pair") as tr, patch(root, "pair", lambda m, inp, out: out + inp):
        out, aux = root.pair(x)
    assert torch.equal(out, torch.full((2,), 3.0)) and aux == "aux"
    assert torch.equal(tr["pair"].input, x)
    assert not root.pair._forward_hooks


def test_forward_hooks_removed_on_exception():
    lin = nn.Linear(2, 2)
    seen = []
    with pytest.raises(KeyError), forward_hooks([(lin, lambda m, i, o: seen.append(o.shape))]):
        lin(torch.zeros(1, 2))
        raise KeyError("x")
    lin(torch.zeros(1, 2))
    assert seen == [torch.Size([1, 2])] and not lin._forward_hooks


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_load_model_round_trip_and_fingerprint(model_type, tmp_path):
    model, tok = _model(model_type), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), attn_implementation="eager")
    assert not loaded.training and loaded_tok.pad_token == "<pad>" and loaded_tok.padding_side == "right"
    assert loaded_tok("Arvelia")["input_ids"] == tok("Arvelia")["input_ids"]
    assert torch.equal(_logits(loaded), _logits(model))
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert model_fingerprint(_model(model_type, seed=1)) != model_fingerprint(model)
    arch = arch_of(loaded)
    with torch.no_grad():
        arch.weight_out_in(arch.mlp_out(0))[3, 5] += 1e-3
    assert model_fingerprint(loaded) != model_fingerprint(model)


def test_load_model_from_object_dtype_and_pad_fallback():
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer, eos_token="<eos>")
    tok.pad_token = None  # transformers 5 picks "<pad>" up from the vocabulary by itself
    model = tiny_model("llama", len(tiny_tokenizer())).train()
    with pytest.raises(TypeError, match="tokenizer"):
        load_model(model)
    out, tok = load_model(model, tok, dtype="bfloat16", device="cpu", attn_implementation="sdpa")
    assert out is model and not model.training and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == "<eos>"
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(model, tok, dtype="float13")


def test_unknown_model_type_lists_supported():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(ValueError, match="mamba") as err:
        arch_of(fake)
    assert all(t in str(err.value) for t in TINY_TYPES)


def test_loading_rejects_missing_paths_and_hub_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="local checkpoints only"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="local checkpoints only"):
        load_model("openai-community/gpt2")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_layer_paths_and_default_layers():
    arch = arch_of(_model("llama"))
    assert arch.layer_path(3, "mlp_out") == "model.layers.3.mlp.down_proj"
    assert arch.layer_path(0, "mlp_in1") == "model.layers.0.mlp.up_proj"
    assert arch.layer_path(1, "self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    with pytest.raises(IndexError):
        arch.layer_path(4, "mlp_out")
    assert arch.default_layers(3) == [1, 2, 3] and arch.default_layers(10) == [0, 1, 2, 3]
    deep = nn.Module()
    deep.model = nn.Module()
    deep.model.layers = nn.ModuleList(nn.Identity() for _ in range(32))
    assert Arch(arch.spec, deep).default_layers(3) == [18, 19, 20]
    two = nn.Module()
    two.model = nn.Module()
    two.model.layers = nn.ModuleList(nn.Identity() for _ in range(2))
    assert Arch(arch.spec, two).default_layers(1) == [1] and Arch(arch.spec, two).default_layers(3) == [0, 1]
    with pytest.raises(ValueError):
        arch.default_layers(0)


def _train_at_layer_2(model: nn.Module, steps: int, prefix: bool, during=None) -> tuple[torch.Tensor, list[float], int]:
    """Adam on a delta added to layer 2's MLP output, one padded batch at every step, with or without
    `frozen_prefix` over layers 0-1: (the delta, the losses, how often layer 0 really ran). Layer 0's MLP output
    is shifted in this thread's forwards (as a method's per-thread switch would): constant, as the block requires."""
    arch, inputs = arch_of(model), _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    d = torch.zeros(arch.out_features(arch.mlp_out(2)), requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.1)
    runs, losses = [0], []

    def count(module, args, out):
        runs[0] += 1
        return out + 0.5

    hooks = [(arch.mlp_out(0), count), (arch.mlp_out(2), lambda m, i, out: out + d)]
    with forward_hooks(hooks), frozen_prefix(model, [arch.layer(0), arch.layer(1)]) if prefix else nullcontext():
        for step in range(steps):
            loss = F.cross_entropy(model(**inputs).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if during is not None and step == 1:
                during()
    return d.detach(), losses, runs[0]


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_frozen_prefix_skips_the_layers_below_and_trains_bitwise_the_same(model_type):
    model = tiny_model(model_type, len(tiny_tokenizer()))
    model.requires_grad_(False)
    base = _logits(model)
    d_off, losses_off, runs_off = _train_at_layer_2(model, 5, prefix=False)
    d_on, losses_on, runs_on = _train_at_layer_2(model, 5, prefix=True)
    assert (runs_off, runs_on) == (5, 1), "layer 0 ran once with the prefix frozen"
    assert torch.equal(d_on, d_off) and losses_on == losses_off
    assert _no_hooks(model) and all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(_logits(model), base)


def test_frozen_prefix_runs_every_layer_for_other_inputs_and_other_threads():
    """Inside the block a forward on other inputs (this thread's, between two steps) computes every layer, and so
    does a forward another thread runs meanwhile on the trainer's own inputs (a server's completion; it must not
    see the trainer's per-thread shift): neither reuses the trainer's layers, and the trainer's steps stay bitwise
    those of a loop without the block."""
    model = tiny_model("llama", len(tiny_tokenizer()))
    model.requires_grad_(False)
    other = dict(tiny_tokenizer()(["Quillon lies beside the sea"], return_tensors="pt"))
    expected = _logits(model)  # the base model on the training inputs
    seen: dict[str, list[torch.Tensor]] = {"here": [], "thread": []}

    def forward(where: str) -> None:
        with torch.no_grad():
            seen[where].append(model(**(other if where == "here" else _inputs())).logits)

    def between() -> None:
        forward("here")
        t = threading.Thread(target=forward, args=("thread",))
        t.start()
        t.join()

    d_off, losses_off, runs_off = _train_at_layer_2(model, 5, prefix=False, during=between)
    d_on, losses_on, runs_on = _train_at_layer_2(model, 5, prefix=True, during=between)
    assert torch.equal(seen["here"][1], seen["here"][0]), "this thread's other forward computed every layer"
    assert torch.equal(seen["thread"][0], expected) and torch.equal(seen["thread"][1], expected)
    assert torch.equal(d_on, d_off) and losses_on == losses_off
    # with the block: step 0, the other forward, step 2 (its inputs changed back), then steps 3-4 reuse
    assert (runs_off, runs_on) == (6, 3)


def test_frozen_prefix_lets_a_trace_below_fire_and_forgets_a_bare_decoder_call():
    """Inside the block a forward that traces a layer below (MetaKE reads each edited layer's keys with one trace
    per forward, on the same inputs) runs every layer, so the trace fires; and a call of the decoder that bypasses
    the top model drops what was kept, so the next step does not reuse layers computed for other inputs."""
    model = tiny_model("llama", len(tiny_tokenizer()))
    model.requires_grad_(False)
    arch, x = arch_of(model), _inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][0, 1] = (y["input_ids"][0, 1] + 1) % 50
    path = arch.layer_path(1, "mlp_out")
    with torch.no_grad(), trace(model, path) as outside:
        model(**x)
    base = _logits(model)
    with torch.no_grad(), frozen_prefix(model, [arch.layer(0), arch.layer(1)]):
        model(**x)
        for _ in range(2):
            with trace(model, path) as tr:
                model(**x)
            assert tr[path].input is not None and torch.equal(tr[path].input, outside[path].input)
        model(**x)
        model.model(**y)  # the decoder alone, on other inputs
        assert torch.equal(model(**x).logits, base)
