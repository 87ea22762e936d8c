"""Per-architecture component map keyed on `config.model_type`.

Every editing method reaches into a model through this map (pyvene style) instead of guessing module
names, so supporting a new architecture means adding one `ArchSpec` row. Paths were checked against the
module trees of transformers 5.x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths of one architecture's editable components."""

    model_type: str
    layers: str  # decoder layer ModuleList, from the model root
    mlp_in: tuple[str, ...]  # MLP input projection(s), relative to a layer
    mlp_out: str  # MLP output projection, relative to a layer
    attn_out: str  # attention output projection, relative to a layer
    final_norm: str  # from the root
    lm_head: str  # from the root
    embed: str  # token embeddings, from the root
    transposed: bool = False  # linear weights stored (in, out), like GPT-2 Conv1D


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Register (or replace) the component map for `spec.model_type`."""
    _ARCHS[spec.model_type] = spec
    return spec


def supported_types() -> list[str]:
    """Sorted list of registered `model_type` values."""
    return sorted(_ARCHS)


def _is_transposed(module: nn.Module, default: bool) -> bool:
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        return True
    return default


class Arch:
    """An `ArchSpec` bound to one model instance: resolves paths and views weights uniformly."""

    def __init__(self, spec: ArchSpec, model: nn.Module):
        self.spec = spec
        self.model = model
        self.num_layers = len(self.module(spec.layers))

    def __repr__(self) -> str:
        return f"Arch({self.spec.model_type!r}, num_layers={self.num_layers})"

    def _index(self, i: int) -> int:
        j = i + self.num_layers if i < 0 else i
        if not 0 <= j < self.num_layers:
            raise IndexError(
                f"layer {i} out of range for a {self.num_layers}-layer {self.spec.model_type} model"
            )
        return j

    def layer_path(self, i: int, component: str) -> str:
        """Dotted path of "mlp_out", "attn_out", "mlp_in0", ... (or any relative path) in layer i."""
        if component in ("mlp_out", "attn_out"):
            rel = getattr(self.spec, component)
        elif component == "mlp_in" or (component.startswith("mlp_in") and component[6:].isdigit()):
            k = int(component[6:] or 0)
            if k >= len(self.spec.mlp_in):
                raise KeyError(f"{self.spec.model_type} has {len(self.spec.mlp_in)} MLP input projection(s)")
            rel = self.spec.mlp_in[k]
        else:
            rel = component
        prefix = f"{self.spec.layers}.{self._index(i)}"
        return f"{prefix}.{rel}" if rel else prefix

    def module(self, path: str) -> nn.Module:
        """The submodule at a dotted path from the model root."""
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise AttributeError(f"{self.spec.model_type} model has no module {path!r}: {e}") from None

    def _module_or(self, path: str, getter: str) -> nn.Module:
        try:
            return self.module(path)
        except AttributeError:
            found = getattr(self.model, getter, lambda: None)()
            if found is None:
                raise
            return found

    def layer(self, i: int) -> nn.Module:
        """Decoder layer i (negative indices count from the end)."""
        return self.module(self.spec.layers)[self._index(i)]

    def mlp_out(self, i: int) -> nn.Module:
        """The MLP output projection of layer i (the usual locate-then-edit target)."""
        return self.module(self.layer_path(i, "mlp_out"))

    def mlp_in(self, i: int) -> list[nn.Module]:
        """The MLP input projection(s) of layer i."""
        return [self.module(self.layer_path(i, f"mlp_in{k}")) for k in range(len(self.spec.mlp_in))]

    def attn_out(self, i: int) -> nn.Module:
        """The attention output projection of layer i."""
        return self.module(self.layer_path(i, "attn_out"))

    def lm_head(self) -> nn.Module:
        """The output (unembedding) projection; falls back to `get_output_embeddings()` on older layouts."""
        return self._module_or(self.spec.lm_head, "get_output_embeddings")

    def embed(self) -> nn.Module:
        """The token embedding table; falls back to `get_input_embeddings()` on older layouts."""
        return self._module_or(self.spec.embed, "get_input_embeddings")

    def final_norm(self) -> nn.Module:
        """The norm applied before the lm_head."""
        return self.module(self.spec.final_norm)

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as an (out_features, in_features) view, whatever the storage layout."""
        w = module.weight
        return w.t() if _is_transposed(module, self.spec.transposed) else w

    def in_features(self, module: nn.Module) -> int:
        """Input width of a linear-like module."""
        return int(self.weight_out_in(module).shape[1])

    def out_features(self, module: nn.Module) -> int:
        """Output width of a linear-like module."""
        return int(self.weight_out_in(module).shape[0])

    def default_layers(self, n: int) -> list[int]:
        """n consecutive upper-middle layers (around 60% depth), clamped to the model's depth."""
        if n < 1:
            raise ValueError(f"need at least one layer, got n={n}")
        n = min(n, self.num_layers)
        centre = int(0.6 * self.num_layers + 0.5)
        start = max(0, min(centre - n // 2, self.num_layers - n))
        return list(range(start, start + n))


def arch_of(model: nn.Module) -> Arch:
    """Bind the registered spec for `model.config.model_type` to `model`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHS:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_types())}. "
            "Register one with editbank.models.register_arch(ArchSpec(...))."
        )
    return Arch(_ARCHS[model_type], model)


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
    register_arch(ArchSpec(model_type=_t, **_LLAMA_LIKE))

register_arch(ArchSpec(model_type="phi3", **{**_LLAMA_LIKE, "mlp_in": ("mlp.gate_up_proj",)}))
# Gemma 3 multimodal (Gemma3ForConditionalGeneration): the text decoder sits under model.language_model.
register_arch(
    ArchSpec(
        model_type="gemma3",
        **{
            **_LLAMA_LIKE,
            "layers": "model.language_model.layers",
            "final_norm": "model.language_model.norm",
            "embed": "model.language_model.embed_tokens",
        },
    )
)
register_arch(
    ArchSpec(
        model_type="gpt2",
        layers="transformer.h",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        transposed=True,
    )
)
register_arch(
    ArchSpec(
        model_type="gptj",
        layers="transformer.h",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    )
)
# transformers 5 renamed GPT-NeoX's `embed_out` to `lm_head` (old checkpoints are remapped on load).
register_arch(
    ArchSpec(
        model_type="gpt_neox",
        layers="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        embed="gpt_neox.embed_in",
    )
)
