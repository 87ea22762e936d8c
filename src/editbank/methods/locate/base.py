"""The shared locate-then-edit method: learn target residuals, then write them layer by layer in closed form.

Subclasses choose the default layers and the solver (`_solve`), and may keep C_p, the sum of earlier edits'
K Kᵀ per layer. Every write's keys K are kept (and stored once, `keys.<seq>.<layer>`), and C_p is their running
sum, rebuilt from them on load, so the store never rewrites a whole (in × in) matrix per edit. Every write is also
stored as low-rank factors (U, V) per layer in an undo log on the method (the newest `max_undo_log` writes), so
undoing the newest edit subtracts U Vᵀ and rebuilds C_p without its keys; older edits return False and the editor
restores a snapshot and replays.

A write can also be computed beside a server's readers (`pretrain`): in the computing thread alone, the edited
modules compute with private copies of their weights, which the write goes into, so other threads keep seeing
the model as it was; installing then adds the same factors to the real weights, which gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ...models.hooks import patch
from ...models.loading import model_fingerprint
from .. import easyedit as ee
from ..base import EditItem, Method
from .keys import context_prefixes, lookup_rows, read_at
from .stats import cached_second_moment, corpus_rows
from .target import optimize_targets


def default_layers(arch, n: int) -> list[int]:
    """Up to n consecutive upper-middle layers, below the last one.

    The target is a residual at the subject's last token, which reaches later tokens only through attention
    in the layers above, so the last edited layer must not be the model's last layer.
    """
    top = max(0, min(arch.default_layers(n)[-1], arch.num_layers - 2))
    return list(range(max(0, top - n + 1), top + 1))


@dataclass
class LogEntry:
    """One applied batch: its edit ids and, per edited layer, the factors U, V (ΔW = U Vᵀ; V None: U is ΔW, for
    factors no smaller than ΔW, as norm control's) and keys K."""

    seq: int  # position in the stream of writes (names the entry's state tensors, so they are written once)
    ids: list[int]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]


class _WithWeight:
    """A module seen with another weight tensor: its class's own forward computes with it."""

    def __init__(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        self.module, self.weight = module, weight

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class LocateMethod(Method):
    """Base of ROME, MEMIT, AlphaEdit and MetaKE."""

    needs_subject = True
    edits_in_weights = True
    trains_beside_readers = True  # a write is computed on private copies of the edited weights (see `pretrain`)
    bench_batch = 100  # the AlphaEdit protocol: sequential batches of 100
    easyedit_rules = {  # what ROME, MEMIT and AlphaEdit files share; each method adds its own
        **{k: ee.to(k) for k in ("layers", "v_lr", "v_num_grad_steps", "kl_factor", "mom2_n_samples")},
        # the reference's decay and clamp forms, so the file's values mean what they meant there
        **{k: (lambda key, value: ({key: value, "target_norms": "reference"}, None))
           for k in ("v_weight_decay", "clamp_norm_factor")},
        "mom2_dataset": ee.mom2_dataset,
        "fact_token": ee.choice({"subject_last": {"fact_token": "subject_last"}, "last": {"fact_token": "last"}}),
        "layer_selection": ee.choice({"all": {}}, "editbank edits every layer in layers"),
        "v_loss_layer": ee.drop("the target loss is always read at the model's output (EasyEdit's last layer)"),
        "context_template_length_params": ee.drop("context prefixes: editbank uses n_prefixes corpus prefixes of "
                                                  "prefix_words words"),
    }
    accumulates = False  # keeps C_p (earlier edits' K Kᵀ) per layer
    default_n_layers = 1

    def __init__(self, model, tokenizer, arch, hparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        n_layers = self.default_n_layers
        self.layers = list(hparams.layers) if hparams.layers is not None else default_layers(arch, n_layers)
        for layer in self.layers:
            if not 0 <= layer < arch.num_layers:
                raise ValueError(f"layer {layer} out of range: the model has {arch.num_layers} layers")
        self.paths = {layer: arch.layer_path(layer, "mlp_out") for layer in self.layers}
        self.modules = {layer: arch.module(p) for layer, p in self.paths.items()}
        # the model is unedited when a method is built: its fingerprint keys the cached statistics, and the
        # base values of the edited weights let statistics be computed later as if on the unedited model
        self.fingerprint = model_fingerprint(model)
        self._base = {layer: m.weight.detach().clone() for layer, m in self.modules.items()}
        self.mom2: dict[int, torch.Tensor] = {}  # E[k kᵀ] per layer (a model statistic: kept across reset)
        self.reset()

    # -- weights --------------------------------------------------------------------------------
    def touched_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {f"{self.paths[layer]}.weight": self.modules[layer].weight for layer in self.layers}

    def weight(self, layer: int) -> torch.Tensor:
        """Layer's MLP output weight as an (out, in) view, whatever the storage (inside `_private`: this thread's
        private copy)."""
        m = self.modules[layer]
        w = self.arch.weight_out_in(m)
        pending = (self.thread.pending or {}).get(layer)
        return w if pending is None else pending if w is m.weight else pending.t()

    @contextmanager
    def _private(self) -> Iterator[None]:
        """In this thread only, the edited modules compute with private copies of their weights and the writes
        (`_add`) go into those: what other threads' forwards see stays as it was."""
        pending = {layer: m.weight.detach().clone() for layer, m in self.modules.items()}

        def swap(layer: int):
            module, weight = self.modules[layer], pending[layer]
            return lambda mod, x, out: type(module).forward(_WithWeight(module, weight), x)

        self.thread.pending = pending
        try:
            with ExitStack() as stack:
                for layer in self.layers:
                    stack.enter_context(patch(self.model, self.paths[layer], swap(layer)))
                yield
        finally:
            self.thread.pending = None

    def drift(self, layer: int) -> torch.Tensor:
        """W − W0 of the layer, (out, in)."""
        w, base = self.weight(layer), self._base[layer]
        return (w - (base.t() if w.stride() != self.modules[layer].weight.stride() else base)).float()

    def norm_weight(self, layer: int, n: int) -> float:
        """μ of norm control for a write of n requests: `norm_control` × tr(C) (tr C: one average key's weight in
        the solve), × n with `norm_per="key"` (the same pull per edit however the edits are batched); 0: off."""
        mu = getattr(self.hparams, "norm_control", 0.0)
        if not mu:
            return 0.0
        return mu * float(self.second_moment(layer).trace()) * (n if self.hparams.norm_per == "key" else 1)

    @torch.no_grad()
    def _add(self, layer: int, u: torch.Tensor, v: torch.Tensor | None, sign: float = 1.0) -> None:
        """W += sign · U Vᵀ (V None: U is ΔW itself)."""
        w = self.weight(layer)
        w.add_((sign * (u if v is None else u @ v.T)).to(w.dtype))

    # -- statistics -----------------------------------------------------------------------------
    @torch.no_grad()
    def second_moment(self, layer: int) -> torch.Tensor:
        """E[k kᵀ] of the layer's keys on the unedited model (computed once, cached on disk)."""
        if layer not in self.mom2:
            hp = self.hparams
            rows = corpus_rows(self.tokenizer, self.stats_corpus or self.corpus, hp.mom2_n_samples, hp.mom2_dataset)
            current = {lay: m.weight.detach().clone() for lay, m in self.modules.items()}
            try:
                for lay, m in self.modules.items():
                    m.weight.copy_(self._base[lay])
                mom2 = cached_second_moment(self.model, self.tokenizer, self.paths[layer], layer, rows,
                                            self.fingerprint, hp.mom2_batch_size)
            finally:
                for lay, m in self.modules.items():
                    m.weight.copy_(current[lay])
            self.mom2[layer] = mom2.to(self.weight(layer).device).float()
        return self.mom2[layer]

    # -- editing --------------------------------------------------------------------------------
    def prefixes(self) -> list[str]:
        return context_prefixes(self.corpus, self.hparams.n_prefixes, self.hparams.prefix_words)

    def keys(self, layer: int, requests, prefixes: list[str]) -> torch.Tensor:
        """K (in × n): the layer's key per request, averaged over the context prefixes."""
        rows = lookup_rows(self.tokenizer, requests, prefixes, self.hparams.fact_token)
        return read_at(self.model, self.tokenizer, self.paths[layer], rows, len(requests), inputs=True).T

    def residual(self, layer: int, requests) -> torch.Tensor:
        """The decoder layer's output at the subject's last token of each plain prompt ([n, hidden])."""
        path = self.arch.layer_path(layer, "")
        rows = lookup_rows(self.tokenizer, requests, [""], self.hparams.fact_token)
        return read_at(self.model, self.tokenizer, path, rows, len(requests), inputs=False)

    def _solve(self, i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def norm_reference(self, requests) -> torch.Tensor | None:
        """h_ref of target_norms="reference" ([n, hidden]; None: the residual h itself). ROME overrides."""
        return None

    def _plan(self, requests, prefixes: list[str]):
        """Learn the target residuals at the last edited layer (MetaKE overrides)."""
        last = self.arch.layer_path(self.layers[-1], "")
        with self.frozen_below(self.layers[-1]):
            return optimize_targets(self.model, self.tokenizer, last, requests, prefixes, self.hparams,
                                    norm_ref=self.norm_reference(requests)), {}

    def prepare(self) -> None:
        for layer in self.layers:
            self.second_moment(layer)

    def groups(self, requests: list) -> list[list]:
        """The requests of one `apply`, in the writes it makes (one; ROME: one per request)."""
        return [requests]

    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        self.prepare()
        return [s for group in self.groups(items) for s in self._write(group)]

    def pretrain(self, requests) -> dict[tuple, tuple] | None:
        """Compute the requests' writes now on private copies of the edited weights (`_private`), for an `apply`
        inside `pretrained(...)` to install. None before the key statistics exist (computing them swaps the
        weights in place: `prepare` first), for a batch that names a request twice, or for several writes whose
        solves read the C_p the earlier ones add."""
        if any(layer not in self.mom2 for layer in self.layers):
            return None
        groups = self.groups(list(requests))
        work = {_key(group): None for group in groups}
        if len(work) < len(groups) or (self.accumulates and len(groups) > 1):  # C_p grows between writes: not here
            return None
        with torch.enable_grad(), self._private():
            for i, group in enumerate(groups):  # each to be installed on the state it was computed on
                work[_key(group)] = (self.version + i, *self._compute(group))
        return work

    def _compute(self, requests) -> tuple[dict[int, tuple], list[dict[str, Any]]]:
        """Plan targets for the batch and write them into every layer (ascending: each layer's keys are read with
        the layers below written); return the factors per layer and the per-request stats."""
        prefixes = self.prefixes()
        target, extra = self._plan(requests, prefixes)
        last = self.layers[-1]
        z = target.h + target.delta
        factors = {}
        for i, layer in enumerate(self.layers):
            keys = self.keys(layer, requests, prefixes)
            resid = (z - self.residual(last, requests)).T / (len(self.layers) - i)
            u, v = self._solve(i, layer, keys, resid)
            if u.shape[1] >= min(u.shape[0], v.shape[0]):  # factors no smaller than ΔW (norm control): keep ΔW
                u, v = u @ v.T, None
            self._add(layer, u, v)
            factors[layer] = (u.detach(), None if v is None else v.detach(), keys.detach())
        realised = self.residual(last, requests) - target.h

        def along(v: torch.Tensor) -> list[float]:  # ⟨realised, v⟩ / ‖v‖² per request
            return ((realised * v).sum(1) / v.square().sum(1).clamp(min=1e-12)).tolist()

        ratio = along(target.delta)
        predicted = extra.pop("_predicted", None)  # MetaKE: the realisation its proxy planned for
        if predicted is not None:
            extra["proxy_ratio"] = along(predicted)
        return factors, [
            {"loss": target.nll[r], "steps": target.steps, "delta_norm": float(target.delta[r].norm()),
             "realised_ratio": float(ratio[r]), **{k: v[r] for k, v in extra.items()}}
            for r in range(len(requests))
        ]

    def _write(self, items: list[EditItem]) -> list[dict[str, Any]]:
        """One write: computed now (into the weights) or taken from `pretrain` (its factors added to the weights,
        the same additions on the same values), then logged."""
        requests = [it.request for it in items]
        done = self.take_pretrained(_key(requests))
        if done is None or done[0] != self.version:  # none, or computed on a state that has changed since: stale
            factors, stats = self._compute(requests)
        else:
            _, factors, stats = done
            for layer, (u, v, _) in factors.items():
                self._add(layer, u, v)
        self.version += 1
        seq = max(self.written, default=-1) + 1
        self.written[seq] = {layer: keys for layer, (_, _, keys) in factors.items()}
        if self.accumulates:
            for layer, keys in self.written[seq].items():
                self._accumulate(layer, keys)
        self.log.append(LogEntry(seq, [it.id for it in items], factors))
        del self.log[: -self.hparams.max_undo_log]
        return stats

    # -- undo -----------------------------------------------------------------------------------
    def remove(self, edit_id: int) -> bool:
        """Exact for the newest edit applied alone, in float32/64: subtract its ΔW, downdate C_p."""
        if not self.log or self.log[-1].ids != [edit_id]:
            return False
        if any(self.modules[layer].weight.dtype not in (torch.float32, torch.float64) for layer in self.layers):
            return False  # half precision: W + ΔW − ΔW is not W; replay from a snapshot instead
        entry = self.log.pop()
        for layer, (u, v, keys) in entry.factors.items():
            self._add(layer, u, v, sign=-1.0)
            if entry.seq not in self.written and layer in self.cp_base:  # an old store's write: in the base
                self.cp_base[layer] = self.cp_base[layer] - keys @ keys.T
        self.written.pop(entry.seq, None)
        self._rebuild_cp()
        self.version += 1
        return True

    def reset(self) -> None:
        # counts the writes, undos and reloads: `pretrain`'s work is installed only on the state it was computed on
        self.version = getattr(self, "version", 0) + 1
        self.cp: dict[int, torch.Tensor] = {}
        self.cp_base: dict[int, torch.Tensor] = {}  # C_p a store from before per-write keys recorded as one matrix
        self.written: dict[int, dict[int, torch.Tensor]] = {}  # write seq -> {layer: its keys K}
        self.log: list[LogEntry] = []

    def _accumulate(self, layer: int, keys: torch.Tensor) -> None:
        kk = keys @ keys.T
        self.cp[layer] = self.cp[layer] + kk if layer in self.cp else kk

    def _rebuild_cp(self) -> None:
        """C_p = the base (old stores) plus every kept write's K Kᵀ, summed in write order (as the stream did)."""
        self.cp = dict(self.cp_base)
        if self.accumulates:
            for seq in sorted(self.written):
                for layer, keys in self.written[seq].items():
                    self._accumulate(layer, keys)

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"cp.{layer}": t for layer, t in self.cp_base.items()}
        for seq, keys in self.written.items():
            tensors.update({f"keys.{seq}.{layer}": k for layer, k in keys.items()})
        for e in self.log:
            for layer, (u, v, _) in e.factors.items():
                tensors.update({f"log.{e.seq}.{layer}.U": u, **({} if v is None else {f"log.{e.seq}.{layer}.V": v})})
        return tensors, {"log": [[e.seq, e.ids] for e in self.log], "layers": self.layers}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta and meta.get("layers", self.layers) != self.layers:
            raise ValueError(f"state was written for layers {meta['layers']}, this method edits {self.layers}")
        dev = self.weight(self.layers[0]).device
        self.reset()
        for name, t in tensors.items():
            if name.startswith("keys."):
                _, seq, layer = name.split(".")
                self.written.setdefault(int(seq), {})[int(layer)] = t.to(dev).float()
        if not self.written:  # a store from before per-write keys: its C_p is one matrix, kept as the base
            self.cp_base = {int(k.split(".")[1]): t.to(dev).float() for k, t in tensors.items() if k.startswith("cp.")}
        self._rebuild_cp()
        for seq, ids in meta.get("log", []):
            factors = {}
            for layer in self.layers:
                if f"log.{seq}.{layer}.U" in tensors:
                    k = tensors.get(f"log.{seq}.{layer}.K")  # old stores kept K in the log
                    k = self.written[int(seq)][layer] if k is None else k.to(dev).float()
                    v = tensors.get(f"log.{seq}.{layer}.V")  # absent: U is the write's ΔW
                    factors[layer] = (tensors[f"log.{seq}.{layer}.U"].to(dev).float(),
                                      None if v is None else v.to(dev).float(), k)
            self.log.append(LogEntry(int(seq), list(ids), factors))


def _key(requests) -> tuple:
    """What names one write's requests in `pretrain`'s result."""
    return tuple((r.prompt, r.target, r.subject) for r in (getattr(x, "request", x) for x in requests))
