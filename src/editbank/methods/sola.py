"""SoLA (arXiv 2603.11239): one frozen LoRA per edit, switched on by semantic routing; undo deletes the key.

Edited modules: the MLP output projections of `n_layers` consecutive upper-middle layers (or `layers`); the
first is the master decision layer. Each edit trains its own LoRA on those modules against the frozen base
model (every other LoRA off) and freezes it. Its key is the input of the master module at the last prompt
token, computed with every LoRA off, stored once and never changed. Since no LoRA sits before the master
module, a query's key is the same whether LoRAs are on or off, so routing never depends on other edits.

Routing, per row of a batch: the query is the row's key computed the same way (ending at its last prompt
token); its nearest key j* (exact search over the key matrix by one matrix product) switches LoRA j* on in
every edited module, at every position of that row, if distance(q, e_j*) < alpha; otherwise the base model
answers. In generation the decision taken on the prompt is kept for every generated token.

The subject gate (`gate="subject"`, the default; subject_gate.py): an edit whose request names its subject is a
candidate only for rows whose prompt contains the subject's tokens, and routes them below `gate_alpha` instead of
alpha. No key, however near, sends a prompt about another subject to the edit, so the threshold can be wide enough
for paraphrases; what it must still refuse is a prompt that names the subject and asks another of its facts, and
gate_alpha is calibrated on exactly those: the `gate_quantile` quantile of distances between calibration texts of
different facts of one subject (the groups' `paraphrase_subjects`; without them, of any two different facts).
Edits without a subject are not gated (alpha, any row). The gate is lexical: an alias or another casing of the
subject does not route (docs/methods/sola.md has what it buys and costs).

The key (`key`): "last" is the paper's, the master module's input at the last prompt token. That vector encodes
the prompt's wording as much as its fact: a paraphrase under another template, or with a sentence in front, lands
far from its edit's key while an unrelated prompt under the same template lands near (docs/methods/sola.md, the
diagnostic). The default "last+pooled" appends the prompt's token embeddings averaged over its tokens, and the
default `whitening="paraphrase"` compares keys relative to how one fact's paraphrases vary: a within-fact
whitening learned from groups of paraphrases of calibration facts (the method's
`paraphrases`; a World supplies its calibration part's, a dataset run its held-out records'), never an evaluated
prompt. Both are computed with every LoRA off and before any LoRA acts, so routing still never depends on other
edits. `key_span="sentence"` (an option) reads a gated edit's key and a row's query against it from the text cut to
the sentence that names the subject, in a forward of its own; measured, not the default (docs/methods/sola.md).

Distance: cosine distance 1 - cos(q', e') between *whitened* keys x' = (x - mean) P. With whitening="pca" P
standardizes each dimension and projects onto the top `key_dims` principal directions of a calibration corpus,
divided by their standard deviations; with "paraphrase" (`_paraphrase_whitening`) it whitens by the within-fact
covariance of the paraphrase groups, so that wording counts little and the fact much (a Mahalanobis-style
metric either way; `standardize=False` compares raw keys,
`distance="l2"` uses Euclidean distance). Whitening removes the large components every hidden state
shares, which otherwise pack all cosines near 1, and makes the scan key_dims wide instead of the module's
input width. The paper fixes alpha = 0.01 and never names the distance; editbank calibrates both per model
(`alpha=None`, the default) once, before the first edit, from a corpus of prompts about distinct facts
(`Editor(corpus=...)`; a World supplies one prompt per fact of its calibration part, never an edited or probed
subject; with no corpus, contexts of texts the model itself writes after random tokens):
  1. mean, standardization and whitening come from the corpus prompts' keys, onto at most a quarter as many
     directions as there are keys (a World's 100-prompt corpus keeps 25 of `key_dims` 64);
  2. alpha = the `alpha_quantile` quantile of the distances between the keys of two different corpus
     prompts (whitening="paraphrase": two texts of different groups): an unrelated prompt falls inside one
     edit's radius with probability alpha_quantile, and with T edits is misrouted with probability at most
     about T x alpha_quantile.
The default alpha_quantile (3e-4 with the paraphrase whitening, 1e-4 with the PCA one) was chosen on the dev world
from the generalization/locality curve measured by
`benchmarks/sola_alpha_sweep.py` (docs/methods/sola.md); `alpha=0.01, standardize=False` is the paper's rule
(`preset="paper"` also takes its training schedule). The calibrated values persist with the store.

Undo deletes the key and frees the LoRA's slot: the outputs of every input no other key routes are
bit-identical to the model without the edit. Re-editing a fact an active edit covers supersedes that edit
(its key stops routing until the newer edit is undone), so one fact never has two live keys. "Covers": the
new prompt routes to it, and it is the same fact: the same prompt (equal routing keys), or the same
`EditRequest.key` (a fact id such as "Arvelia/capital"). Routing alone would also merge different facts
that happen to lie within alpha, and a shared subject is not enough (a subject has many facts).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..tokens import make_batch, pad_id, prompt_ids
from .base import Checked, EditFailed, EditItem, register, stable_seed
from .fit import cosine_lr, fit, make_optimizer
from .key_index import require_faiss
from .locate.keys import context_prefixes
from .lora_bank import DISTANCES, LoraBank
from .routed import Routed, prompt_mean
from .subject_gate import SubjectGate, subject_sentence

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's schedule and fixed threshold
    "paper": {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "n_iter": 40, "stop_loss": 0.0, "alpha": 0.01,
              "standardize": False, "key": "last", "whitening": "pca", "gate": "none"},
}
KEYS = ("last", "pooled", "last+pooled")
WHITENINGS = ("pca", "paraphrase")
GATES = ("none", "subject")
SPANS = ("prompt", "sentence")


@dataclass
class SolaHparams(Checked):
    layers: list[int] | None = None  # decoder layers whose MLP output projection gets LoRAs; first = master
    n_layers: int = 3  # with layers=None: this many consecutive upper-middle layers
    rank: int = 4
    lora_scale: float = 1.0  # the LoRA's output is scaled by this
    optimizer: str = "adam"  # "adam" or "sgd" (the paper's)
    lr: float = 1e-2
    schedule: str = "cosine"  # learning-rate schedule over n_iter steps: "cosine" or "constant"
    n_iter: int = 60  # at most this many steps per edit
    stop_loss: float = 1e-2  # stop once the target's mean NLL is below this (0: always run n_iter steps)
    distance: str = "cosine"  # "cosine" (1 - cos) or "l2"
    alpha: float | None = None  # fixed routing threshold (the paper: 0.01); None: calibrated per model
    # calibrated alpha: P(distance < alpha) for two unrelated prompts; None: 3e-4 with the paraphrase whitening,
    # 1e-4 with the PCA one (each the dev world's choice, docs/methods/sola.md)
    alpha_quantile: float | None = None
    standardize: bool = True  # compare whitened keys (statistics of the calibration corpus); False: raw keys
    # whitened directions kept: whitening="pca" this many principal directions (0: every dimension, standardized);
    # "paraphrase" 4 x this many (at most half the calibration texts)
    key_dims: int = 64
    # the routing key: "last" (the paper's: the master module's input at the last prompt token), "pooled" (the
    # token embeddings averaged over the prompt), "last+pooled" (both, concatenated)
    key: str = "last+pooled"
    # "paraphrase": whitened by how one fact's paraphrases vary (the method's `paraphrases` groups: the key's
    # wording is whitened away); "pca": principal directions of the corpus keys. Without paraphrase groups,
    # "paraphrase" falls back to "pca" (with a warning)
    whitening: str = "paraphrase"
    shrinkage: float = 0.3  # whitening="paraphrase": the within-fact covariance is shrunk this far to its mean variance
    # "subject": an edit whose request names its subject routes only prompts that contain the subject's tokens, within
    # the wider gate_alpha (subject_gate.py); edits without a subject route as with "none" (any prompt within alpha)
    gate: str = "subject"
    # the gate also finds the subject right after a mark such as "(" or a quote (SentencePiece spells it otherwise
    # there); False: alone and after a space only (stores made before it)
    gate_marks: bool = True
    # with the gate: "sentence" reads a gated edit's key, and a prompt's query against it, from the text cut to the
    # sentence that names the subject (its last mention), so a sentence before it does not move the key; "prompt":
    # the whole prompt. Edits without a subject, and prompts with nothing before that sentence, use the whole prompt.
    # An option, measured in docs/methods/sola.md ("Keys from the subject's sentence"): not the default
    key_span: str = "prompt"
    # gate_alpha (never below alpha) = this quantile of the distances between calibration texts of different facts of
    # one subject (`paraphrase_subjects`; a World supplies them), else of any two different facts; None: 1e-3 and
    # 3e-3 respectively (each the dev world's choice, docs/methods/sola.md)
    gate_quantile: float | None = None
    # train each LoRA on its prompt and on the prompt after this many context prefixes (the first words of corpus
    # texts, as the locate methods' keys are read), so that it writes the target whatever comes before; 0: the prompt
    train_prefixes: int = 0
    index: str = "exact"  # nearest-key search: "exact" (one matrix product) or "faiss" (HNSW, for 100,000+ keys)
    index_candidates: int = 16  # with index="faiss": candidates re-scored exactly per query
    calibration_samples: int = 512  # corpus prompts used to calibrate alpha (at most)
    calibration_seed: int = 0
    # an edit's LoRA initialisation derives from this and the request (never from its edit id); the editor's own
    # seed does not reach it, so a bench's seeds vary SoLA's stream, not its initialisation (vary this for that)
    seed: int = 0
    preset: str | None = None  # "paper": SGD, lr 0.05, cosine, 40 steps, alpha 0.01 (fills fields left at default)

    checks: ClassVar[dict[str, tuple | str]] = {
        "preset": tuple(PRESETS), "rank": ">= 1", "n_layers": ">= 1", "n_iter": ">= 1", "lr": "> 0",
        "lora_scale": "> 0", "stop_loss": ">= 0", "alpha": "> 0", "alpha_quantile": "(0, 1)",
        "optimizer": ("adam", "sgd"), "schedule": ("cosine", "constant"), "distance": DISTANCES,
        "index": ("exact", "faiss"), "index_candidates": ">= 1", "key_dims": ">= 0", "train_prefixes": ">= 0",
        "calibration_samples": ">= 8", "key": KEYS, "whitening": WHITENINGS, "shrinkage": "[0, 1]", "gate": GATES,
        "gate_quantile": "(0, 1)", "key_span": SPANS}

    def validate(self) -> None:
        super().validate()
        if self.preset is not None:  # fills the fields left at their defaults (its values pass the checks)
            defaults = SolaHparams()
            for k, v in PRESETS[self.preset].items():
                if getattr(self, k) == getattr(defaults, k):
                    setattr(self, k, v)
        if self.index == "faiss":
            require_faiss()  # a clear error now if FAISS is not installed
        if self.key_span == "sentence" and self.gate != "subject":
            raise ValueError("key_span='sentence' cuts gated keys: it needs gate='subject'")


@register("sola")
class Sola(Routed):
    Hparams = SolaHparams
    snapshots = False  # undo is always exact
    trains_beside_readers = True  # each LoRA trains alone against the frozen base (see `pretrain`)
    state_in_artifacts = True  # each edit's key and LoRA are stored once, as its artifacts
    stored_defaults = {"key": "last", "whitening": "pca", "gate": "none",  # stores made before these existed
                       "gate_marks": False}

    def __init__(self, model, tokenizer, arch, hparams: SolaHparams) -> None:
        super().__init__(model, tokenizer, arch, hparams)
        n = arch.num_layers
        self.layers = list(hparams.layers) if hparams.layers is not None else arch.default_layers(hparams.n_layers)
        if not self.layers or any(not 0 <= i < n for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} must be distinct decoder layers of the model's {n}")
        if self.layers != sorted(self.layers):
            # a LoRA below the master layer would change the queries that route it
            raise ValueError(f"layers {self.layers} must be ascending: the first (lowest) is the master layer")
        self.paths = [arch.layer_path(i, "mlp_out") for i in self.layers]
        self.modules = [arch.module(p) for p in self.paths]
        shapes = [tuple(arch.weight_out_in(m).shape) for m in self.modules]
        w = arch.weight_out_in(self.modules[0])
        ann = hparams.index_candidates if hparams.index == "faiss" else 0
        devices = [arch.weight_out_in(m).device for m in self.modules]
        self.embeddings = model.get_input_embeddings()
        width = (0 if hparams.key == "pooled" else shapes[0][1]) + (
            self.embeddings.weight.shape[1] if "pooled" in hparams.key else 0)  # the key: last and/or pooled part
        self.bank = LoraBank(width, shapes, hparams.rank, w.dtype, w.device, hparams.distance, ann, devices)
        self.alpha: float | None = None
        self.gate_alpha: float | None = None  # gate="subject": the threshold of gated edits
        self.gate_from: str | None = None  # which calibration pairs gave it: "one subject" or "any"
        self.reference_distance: float | None = None
        self.quantile_used: float | None = hparams.alpha_quantile  # the calibration's (None: not calibrated here)
        for i, m in enumerate(self.modules):
            self.hook(m, self._make_hook(i))
        if "pooled" in hparams.key or hparams.gate == "subject":  # this forward's token embeddings and ids
            self.hook(self.embeddings, self._embedding_hook)
        self.reset()

    def reset(self) -> None:
        """Forget every edit; the calibrated alpha (a property of the base model) is kept."""
        self.bank.clear()
        self.superseded_by: dict[int, int] = {}
        self.facts: dict[int, str | None] = {}  # EditRequest.key of each held edit (see "Covers" above)
        self.subjects: dict[int, str] = {}  # EditRequest.subject of each held edit that names one (the gate)
        self._gate_cache: tuple | None = None  # (SubjectGate | None,) for the bank as it is

    # -- hooks ------------------------------------------------------------------------------------
    def _embedding_hook(self, module, inputs, output) -> None:
        self.thread.embeds, self.thread.ids = output, inputs[0]

    def _make_hook(self, i: int):
        scale = self.hparams.lora_scale

        def hook(module, inputs, output):
            x, here = inputs[0], self.thread  # per thread: a training thread and a serving one run at once
            if i == 0 and getattr(here, "capture", None) is not None:  # `_keys_at` reads the master input here
                here.capture.append((x.detach(), self._embeds(x)))
            train = self.trainee
            if train is not None:  # training one edit: its LoRA on every row and position
                if i == 0:
                    here.ids = here.embeds = None  # this forward's, not needed
                A, B = train
                return output + ((x.float() @ A[i].T) @ B[i].T * scale).to(output.dtype)
            if i == 0:
                here.now = self._decide(x) if self.enabled else None  # this forward's routing decision
                here.ids = here.embeds = None  # this forward's, read (or not needed) by now
            now = getattr(here, "now", None)
            if now is None:
                return None
            rows, every_row, loras = now
            at, bt = loras[i]
            if not every_row and rows.device != x.device:  # a model split across devices
                rows = rows.to(x.device)
            xs = x if every_row else x.index_select(0, rows)
            delta = ((xs.to(at.dtype) @ at) @ bt).to(output.dtype)  # 2-d LoRAs (one row) broadcast
            if every_row:
                return torch.add(output, delta, alpha=scale)
            return output.index_add(0, rows, delta, alpha=scale)

        return hook

    def _decide(self, x: torch.Tensor):
        """Rows whose query routes to an edit, whether that is every row, and the routed rows' LoRAs per
        module (None: no row routes)."""
        b, s = x.shape[:2]

        def compute():
            if not len(self.bank) or self.alpha is None:
                return None
            route = self.route
            start = None if route is None else route.query_start
            qidx = self.query_index(b, s, x.device)
            q = self._query(x, self._embeds(x), qidx, start)
            hit, slot = self._nearest(q, lambda: self._row_ids(x, qidx, start))
            if b == 1:  # the common serving case: plain slices instead of gathers
                return (None, True, self.bank.slices(int(slot[0]))) if bool(hit[0]) else None
            rows = hit.nonzero().squeeze(1)
            n = rows.numel()
            return (rows, n == b, self.bank.gather(slot if n == b else slot.index_select(0, rows))) if n else None

        return self.decide("sola", s, compute)  # a generated token keeps the decision taken on the prompt

    def _nearest(self, q: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed [B], slot [B]) of queries [B, width]; `rows()` gives each row's prompt token ids (the gate's).

        With the gate: the nearest of the row's candidates within its threshold, the ungated edits' (any row, within
        alpha; searched as without the gate, less the gated keys) and the gated edits the row names (within
        gate_alpha; only those slots are scored, so a large gated bank costs what the row's subjects hold)."""
        bank, gate = self.bank, self._gate()
        if gate is None:
            dist, slot = bank.nearest(q)
            return dist < self.alpha, slot
        n = q.shape[0]
        best, slot = [float("inf")] * n, [0] * n
        if gate.any_open:  # ungated edits: any row, within alpha, searched as without the gate less the gated keys
            dist, found = bank.nearest(q, exclude=gate.gated)
            best = [d if d < self.alpha else float("inf") for d in dist.tolist()]
            slot = found.tolist()
        ids = rows()
        pairs = [(r, s) for r, found in enumerate(gate.candidates(ids)) for s in found]
        if pairs:
            r_idx = torch.tensor([r for r, _ in pairs], device=q.device)
            s_idx = torch.tensor([s for _, s in pairs], device=bank.device)
            d = bank.pair_distances(self._span_queries(q.index_select(0, r_idx), pairs, ids, gate), s_idx)
            for (r, s), v in zip(pairs, d.tolist()):
                if v < self.gate_alpha and v < best[r]:
                    best[r], slot[r] = v, s
        hit = torch.tensor([b < float("inf") for b in best], device=q.device)
        return hit, torch.tensor(slot, dtype=torch.long, device=q.device)

    def _span_queries(self, qp: torch.Tensor, pairs: list[tuple[int, int]], ids: list[list[int]],
                      gate: SubjectGate, known: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The queries of (row, gated slot) pairs: with key_span="sentence", a row whose text has a sentence before
        the one naming the slot's subject is queried by the key of the text from that sentence on (read alone, as
        the edit's own key was; `known`: keys of cut texts already read), else by its whole-prompt query `qp[j]`."""
        if self.hparams.key_span != "sentence":
            return qp
        texts: dict[int, str] = {}
        keys: dict[str, torch.Tensor] = dict(known or {})
        out = None
        for j, (r, s) in enumerate(pairs):
            if r not in texts:
                texts[r] = self._text(ids[r])
            tail = subject_sentence(texts[r], gate.subjects[s])
            if tail is None:
                continue
            if tail not in keys:
                keys[tail] = self.key_of(tail).to(qp.device, qp.dtype)  # alone: the same numbers in any batch
            out = qp.clone() if out is None else out
            out[j] = keys[tail]
        return qp if out is None else out

    def _text(self, ids: list[int]) -> str:
        """A prompt's text as the routing cut reads it (decoded from its ids, special tokens left out)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _span(self, text: str, subject: str | None) -> str:
        """The text a gated key is read from (`key_span`): the text from the sentence naming the subject on, or all."""
        if subject is None or self.hparams.key_span != "sentence" or self.hparams.gate != "subject":
            return text
        return subject_sentence(text, subject) or text

    def _gate(self) -> SubjectGate | None:
        """The subject gate for the bank as it is, or None when no held edit is gated."""
        cache = self._gate_cache
        if cache is None:
            slots = self.bank.slot_of
            forms = {slots[e]: self.subject_forms(s) for e, s in self.subjects.items() if e in slots}
            gate = None
            if self.hparams.gate == "subject" and forms and self.gate_alpha is not None:
                gate = SubjectGate(forms, self.bank.high, self.bank.device, ungated=len(slots) - len(forms),
                                   subjects={slots[e]: s for e, s in self.subjects.items() if e in slots})
            cache = self._gate_cache = (gate,)
        return cache[0]

    def _row_ids(self, x: torch.Tensor, qidx: torch.Tensor, start: torch.Tensor | None) -> list[list[int]]:
        """This forward's prompt token ids per row (start..qidx), from the embedding hook."""
        ids, self.thread.ids = getattr(self.thread, "ids", None), None
        if ids is None or ids.shape[:2] != x.shape[:2]:
            raise RuntimeError("SoLA's subject gate needs this forward's token ids: call the model with input_ids "
                               "(not inputs_embeds)")
        first = [0] * len(qidx) if start is None else start.tolist()
        return [row[a : q + 1] for row, a, q in zip(ids.tolist(), first, qidx.tolist())]

    # -- keys -------------------------------------------------------------------------------------
    def _embeds(self, x: torch.Tensor) -> torch.Tensor | None:
        """This forward's token embeddings (pooled keys), taken from the embedding hook once."""
        if "pooled" not in self.hparams.key:
            return None
        e, self.thread.embeds = getattr(self.thread, "embeds", None), None
        if e is None or e.shape[:2] != x.shape[:2]:
            raise RuntimeError("SoLA's pooled key needs this forward's token embeddings: call the model with "
                               "input_ids (not inputs_embeds)")
        return e

    def _query(self, x: torch.Tensor, embeds: torch.Tensor | None, qidx: torch.Tensor,
               start: torch.Tensor | None) -> torch.Tensor:
        """Routing keys [B, width] of the rows of one forward: the master input at `qidx` and/or the token
        embeddings averaged over positions start..qidx (float64 sums: a row's key does not depend on its padding)."""
        rows = torch.arange(x.shape[0], device=x.device)
        parts = [] if self.hparams.key == "pooled" else [x[rows, qidx]]
        if embeds is not None:
            first = None if start is None else start.to(qidx.device)
            parts.append(prompt_mean(embeds, qidx, first).to(x.dtype).to(x.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self) -> float:
        """Set the key standardization and alpha from the unedited model (the module docstring has the rule)."""
        hp = self.hparams
        if hp.alpha is not None and not hp.standardize:
            self.alpha = self.gate_alpha = hp.alpha
            self.gate_from = "alpha"
            return self.alpha
        paraphrase = hp.standardize and hp.whitening == "paraphrase" and hp.key_dims > 0  # key_dims 0: per dimension
        named = self._paraphrase_groups() if paraphrase else None
        groups = None if named is None else [g for _, g in named]
        if groups is not None:  # the paraphrase whitening, and alpha between the groups' texts (different facts)
            keys, group = self._prompt_keys([self._span(p, s) for s, g in named for p in g]), torch.tensor(
                [i for i, g in enumerate(groups) for _ in g], device=self.bank.device)
            self.bank.set_transform(*_paraphrase_whitening(keys, group, hp.key_dims, hp.shrinkage))
        else:
            keys, group = self._corpus_keys() if self.corpus else self._sampled_keys()
        if hp.standardize and groups is None:
            # from the corpus keys alone (whitening on every calibration text as well spread the keys and cost
            # locality: docs/methods/sola.md, "What the goal asked")
            self.bank.set_transform(*_whitening(keys, hp.key_dims))
        z = self.bank.index_form(keys)
        d = 1.0 - z @ z.T if hp.distance == "cosine" else torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
        pairs = torch.triu(group[:, None] != group[None, :], diagonal=1)  # distinct prompts or texts
        unrelated = d[pairs].sort().values
        self.calibration_distances = unrelated  # kept for diagnostics (alpha sweeps); not persisted
        if unrelated.numel() < 10:
            raise EditFailed("cannot calibrate alpha: fewer than 10 pairs of unrelated calibration prompts")
        self.quantile_used = hp.alpha_quantile or (3e-4 if groups is not None else 1e-4)
        self.reference_distance = quantile(unrelated, self.quantile_used)
        median = float(unrelated[len(unrelated) // 2])
        advice = "give prompts about distinct facts, or a larger alpha_quantile, or a fixed alpha"
        if hp.alpha is None and not self.reference_distance > 1e-6 * median:
            raise EditFailed(f"calibrated alpha is {self.reference_distance:.3g}: the corpus has duplicate prompts; "
                             f"{advice}")
        if hp.alpha is None and self.reference_distance < 0.01 * median:
            warnings.warn(f"calibrated alpha {self.reference_distance:.3g} is under 1% of the median distance between "
                          f"corpus prompts ({median:.3g}): near-duplicate prompts? Paraphrases may not route; {advice}",
                          stacklevel=2)
        self.alpha = hp.alpha if hp.alpha is not None else self.reference_distance
        one_subject = None if named is None else _one_subject_pairs([s for s, _ in named], group, pairs)
        self.gate_from = "one subject" if one_subject is not None and int(one_subject.sum()) >= 10 else "any"
        pool = d[one_subject].sort().values if self.gate_from == "one subject" else unrelated
        q = hp.gate_quantile or (1e-3 if self.gate_from == "one subject" else 3e-3)
        self.gate_alpha = max(self.alpha, quantile(pool, q))
        self._gate_cache = None
        return self.alpha

    def _paraphrase_groups(self) -> list[tuple[str | None, list[str]]] | None:
        """The method's paraphrase groups for the paraphrase whitening (distinct prompts, each in one group, at
        least two per group; groups sampled by calibration_seed down to about 4 x calibration_samples texts), each
        with its subject (`paraphrase_subjects`; None where unknown), or None (with a warning) when there are too
        few to learn from."""
        seen: set[tuple[int, ...]] = set()
        groups = []
        subjects = self.paraphrase_subjects or [None] * len(self.paraphrases or [])
        for subject, g in zip(subjects, self.paraphrases or []):
            kept = []
            for p in g:
                ids = tuple(prompt_ids(self.tokenizer, p))
                if ids not in seen:  # prompts that tokenize alike are one prompt, in the first group that has it
                    seen.add(ids)
                    kept.append(p)
            if len(kept) >= 2:
                groups.append((subject, kept))
        if len(groups) < 8:
            warnings.warn(f"SoLA whitening='paraphrase' needs 8 or more groups of paraphrases (Editor(paraphrases=...);"
                          f" a World supplies them), got {len(groups)}: whitening the corpus keys instead (pca)",
                          stacklevel=3)
            return None
        budget = 4 * self.hparams.calibration_samples
        if sum(len(g) for _, g in groups) > budget:
            order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(self.hparams.calibration_seed))
            picked, n = [], 0
            for i in order.tolist():
                if n + len(groups[i][1]) <= budget:
                    picked.append(i)
                    n += len(groups[i][1])
            groups = [groups[i] for i in sorted(picked)]
        return groups

    def _keys_at(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Master inputs [B, T, D] and (pooled keys) token embeddings [B, T, E] of a right-padded batch, every
        LoRA off, read through the method's own hooks, per thread: a temporary hook would also catch the forwards
        other threads run meanwhile (an edit training beside the readers), and adding hooks is not thread-safe."""
        attached = self.attached
        if not attached:  # not attached (a closed editor's method): hooks for this forward only
            self.attach()
        self.thread.capture = []
        try:
            with self.disabled():
                self.model(input_ids=ids, attention_mask=mask)
            x, embeds = self.thread.capture[0]
            return x, embeds
        finally:
            self.thread.capture = None
            if not attached:
                self.detach()

    def _prompt_keys(self, prompts: list[str]) -> torch.Tensor:
        """Routing keys [N, width] of prompts (ending at their last token), in batches of 64."""
        keys = []
        for i in range(0, len(prompts), 64):
            batch = make_batch(self.tokenizer, [(p, " x") for p in prompts[i : i + 64]], device=self.bank.device)
            x, embeds = self._keys_at(batch.input_ids, batch.attention_mask)
            keys.append(self._query(x, embeds, batch.query_index.to(x.device), None).float())
        return torch.cat(keys)

    def _corpus_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of (at most calibration_samples, chosen by calibration_seed) corpus prompts, grouped by text."""
        distinct: dict[tuple[int, ...], str] = {}  # prompts that tokenize alike are one prompt
        for p in sorted(set(self.corpus)):
            distinct.setdefault(tuple(prompt_ids(self.tokenizer, p)), p)
        prompts = list(distinct.values())
        if len(prompts) > self.hparams.calibration_samples:
            g = torch.Generator().manual_seed(self.hparams.calibration_seed)
            pick = torch.randperm(len(prompts), generator=g)[: self.hparams.calibration_samples]
            prompts = [prompts[i] for i in sorted(pick.tolist())]
        return self._prompt_keys(prompts), torch.arange(len(prompts), device=self.bank.device)

    def _sampled_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No corpus: keys of the distinct contexts in texts the unedited model writes after random tokens."""
        hp, tok, dev = self.hparams, self.tokenizer, self.bank.device
        n = max(8, hp.calibration_samples // 4)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.disabled():
            torch.manual_seed(hp.calibration_seed)
            vocab = min(len(tok), self.model.get_input_embeddings().num_embeddings)
            ids = torch.randint(0, vocab, (n, 1), device=dev)
            if tok.bos_token_id is not None:
                ids = torch.cat([torch.full_like(ids, tok.bos_token_id), ids], dim=1)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=4, pad_token_id=pad_id(tok),
            )
        valid = _before_eos(out, tok.eos_token_id, ids.shape[1])
        x, embeds = self._keys_at(out, valid.long())
        valid[:, : ids.shape[1] - 1] = False  # a bos alone is no context
        seen: dict[tuple[int, ...], int] = {}
        rows, ends = [], []
        for r, p in valid.nonzero().tolist():
            context = tuple(out[r, : p + 1].tolist())
            if context not in seen:  # identical contexts have identical keys: count each once
                seen[context] = len(seen)
                rows.append(r)
                ends.append(p)
        r, p = torch.tensor(rows, device=dev), torch.tensor(ends, device=dev)
        keys = self._query(x[r], None if embeds is None else embeds[r], p, None).float()
        return keys, r  # grouped by text

    # -- editing ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.alpha is None:
            self.calibrate()

    def apply(self, items: list[EditItem]) -> list[dict[str, Any]]:
        self.prepare()
        return [self._apply_one(it) for it in items]

    def pretrain(self, requests) -> dict[tuple[str, str], tuple] | None:
        """Train the requests' LoRAs now (each alone against the frozen base; the bank is not touched), for an
        `apply` inside `pretrained(...)` to install. Needs the calibration done (`prepare`): None before it."""
        if self.alpha is None:
            return None
        with torch.enable_grad():
            return {(r.prompt, r.target): self._train(r.prompt, r.target) for r in requests}

    @torch.no_grad()
    def key_of(self, prompt: str) -> torch.Tensor:
        """The routing key of a prompt (`key`: the master module's input at its last token and/or its pooled
        token embeddings), every LoRA off."""
        ids = torch.tensor([prompt_ids(self.tokenizer, prompt)], device=self.bank.device)
        x, embeds = self._keys_at(ids, torch.ones_like(ids))
        return self._query(x, embeds, torch.tensor([ids.shape[1] - 1], device=x.device), None)[0]

    @torch.no_grad()
    def routes(self, prompts: list[str]) -> list[int | None]:
        """The edit each prompt routes to (None: no key is within alpha and the base model answers)."""
        if not prompts or self.alpha is None:
            return [None] * len(prompts)
        owners = self.bank.owners()
        hit, slot = self._nearest(self._prompt_keys(prompts), lambda: [prompt_ids(self.tokenizer, p) for p in prompts])
        return [owners[s] if h else None for h, s in zip(hit.tolist(), slot.tolist())]

    def _apply_one(self, item: EditItem) -> dict[str, Any]:
        req = item.request
        stats: dict[str, Any] = {"alpha": self.alpha}
        subject = self.spelled_subject(req, stats)
        ids = prompt_ids(self.tokenizer, req.prompt)
        span = None
        if subject is not None and self.hparams.key_span == "sentence" and self.hparams.gate == "subject":
            # cut the decoded prompt, as a row's query is cut (`_span_queries`)
            span = subject_sentence(self._text(ids), subject)
            if span is not None:
                stats["key_from"] = span
        whole = self.key_of(req.prompt)
        key = whole if span is None else self.key_of(span)
        covered: list[int] = []
        if len(self.bank):
            d = self.bank.distances(whole[None])[0]  # what a row of this prompt is queried with: ungated slots
            queries = {}
            stats["nearest_distance"] = float(d.min())
            owners = self.bank.owners()
            within = d < self.alpha
            gate = self._gate()
            if gate is not None:  # a gated edit covers what names its subject within gate_alpha (as it routes)
                named = torch.zeros_like(within)
                found = gate.candidates([ids])[0]
                if found:
                    named[found] = True
                    if self.hparams.key_span == "sentence":  # gated slots: the prompt cut at each one's subject
                        pairs = [(0, s) for s in found]
                        q = self._span_queries(whole[None].repeat(len(found), 1), pairs, [ids], gate,
                                               known={} if span is None else {span: key})
                        d[found] = self.bank.pair_distances(q, torch.tensor(found, device=self.bank.device))
                        queries = dict(zip(found, q))
                within = torch.where(gate.gated, named & (d < self.gate_alpha), within)
            hits = within.nonzero().squeeze(1)
            asked = torch.stack([queries.get(s, whole) for s in hits.tolist()]) if len(hits) else whole[None]
            same = torch.isclose(self.bank.keys[hits], asked, rtol=1e-4, atol=1e-6).all(dim=1)
            for s, same_prompt in zip(hits.tolist(), same.tolist()):
                eid = owners[s]
                if same_prompt or (req.key is not None and req.key == self.facts[eid]):
                    covered.append(eid)
        trained = self.take_pretrained((req.prompt, req.target))  # the same numbers `_train` gives now
        A, B, loss, steps = trained if trained is not None else self._train(req.prompt, req.target)
        for eid in covered:  # the newer edit supersedes what covered this fact before
            self.bank.set_active(eid, False)
            self.superseded_by[eid] = item.id
        self.bank.add(item.id, key, A, B, active=True)
        self.facts[item.id] = req.key
        if subject is not None:
            self.subjects[item.id] = subject
        self._gate_cache = None
        stats.update(loss=loss, steps=steps, action="supersede" if covered else "new")
        if covered:
            stats["supersedes"] = covered
        return stats

    def _train(self, prompt: str, target: str) -> tuple[list[torch.Tensor], list[torch.Tensor], float, int]:
        """Train this edit's LoRA alone against the frozen base model (every other LoRA off)."""
        hp, dev = self.hparams, self.bank.device
        prefixes = context_prefixes(self.corpus, hp.train_prefixes, 5)
        batch = make_batch(self.tokenizer, [(p + prompt, target) for p in prefixes], device=dev)
        devs = self.bank.module_devices
        # from the request, not the edit id: undo is then exact in the strong sense (the kept edits equal what a
        # fresh editor fed only them would write, whatever ids it gives them)
        g = torch.Generator().manual_seed(stable_seed(hp.seed, prompt, target))
        A = [(torch.randn((hp.rank, i), generator=g) / math.sqrt(i)).to(d) for (_, i), d in zip(self.bank.shapes, devs)]
        B = [torch.zeros((o, hp.rank), device=d) for (o, _), d in zip(self.bank.shapes, devs)]
        opt = make_optimizer(hp.optimizer, [t.requires_grad_(True) for t in A + B], hp.lr)

        def loss_fn() -> torch.Tensor:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten())

        with self.training((A, B)), self.frozen_below(self.layers[0]):
            done = fit(loss_fn, opt, hp.n_iter, what="SoLA LoRA training", stop_loss=hp.stop_loss,
                       lr=cosine_lr(hp.lr, hp.n_iter) if hp.schedule == "cosine" else None)
        A = [a.detach() for a in A]
        B = [b.detach() for b in B]
        if not all(torch.isfinite(t).all() for t in A + B):
            raise EditFailed("SoLA LoRA training produced non-finite weights")
        return A, B, done.loss, done.steps

    def remove(self, edit_id: int) -> bool:
        if edit_id not in self.bank.slot_of:
            return False
        newer = self.superseded_by.pop(edit_id, None)
        for old, new in list(self.superseded_by.items()):
            if new != edit_id:
                continue
            if newer is None:  # the undone edit was active: what it superseded routes again
                del self.superseded_by[old]
                self.bank.set_active(old, True)
            else:  # it was superseded itself: its successor now supersedes what it superseded
                self.superseded_by[old] = newer
        self.bank.remove(edit_id)
        del self.facts[edit_id]
        self.subjects.pop(edit_id, None)
        self._gate_cache = None
        return True

    # -- persistence ------------------------------------------------------------------------------
    def artifacts(self, edit_id: int) -> dict[str, torch.Tensor]:
        if edit_id not in self.bank.slot_of:
            return {}
        key, A, B = self.bank.lora(edit_id)
        out = {"key": key}
        if self.facts[edit_id] is not None:
            out["fact"] = torch.tensor(list(self.facts[edit_id].encode()), dtype=torch.uint8)
        if edit_id in self.subjects:
            out["subject"] = torch.tensor(list(self.subjects[edit_id].encode()), dtype=torch.uint8)
        out.update({f"A.{i}": a for i, a in enumerate(A)})
        out.update({f"B.{i}": b for i, b in enumerate(B)})
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"center": self.bank.center}
        if self.bank.projection is not None:
            tensors["projection"] = self.bank.projection
        meta = {
            "alpha": self.alpha,
            "gate_alpha": self.gate_alpha,
            "gate_from": self.gate_from,
            "reference_distance": self.reference_distance,
            "superseded_by": {str(k): v for k, v in self.superseded_by.items()},
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.reset()
        if tensors:
            self.bank.set_transform(tensors["center"], tensors.get("projection"))
        if meta:
            self.alpha, self.reference_distance = meta["alpha"], meta["reference_distance"]
            self.gate_alpha = meta.get("gate_alpha")  # stores made before the gate: None (they do not gate)
            self.gate_from = meta.get("gate_from")
            self.superseded_by = {int(k): int(v) for k, v in meta["superseded_by"].items()}

    def load_artifacts(self, held) -> None:
        n = len(self.bank.shapes)
        for eid, arts in held:
            missing = [k for k in ["key"] + [f"{p}.{i}" for p in "AB" for i in range(n)] if k not in arts]
            if missing:
                raise ValueError(f"stored SoLA edit {eid} lacks artifacts {missing}")
            A = [arts[f"A.{i}"] for i in range(n)]
            B = [arts[f"B.{i}"] for i in range(n)]
            self.bank.add(eid, arts["key"], A, B, active=eid not in self.superseded_by)
            self.facts[eid] = bytes(arts["fact"].tolist()).decode() if "fact" in arts else None
            if "subject" in arts:
                self.subjects[eid] = bytes(arts["subject"].tolist()).decode()
        self._gate_cache = None

    def checkpoint(self) -> Any:
        """Cheap: the bank's slot table and the small dicts (slot contents are never overwritten in place)."""
        return (self.bank.checkpoint(), dict(self.superseded_by), dict(self.facts), dict(self.subjects),
                self.alpha, self.gate_alpha, self.gate_from, self.reference_distance)

    def restore(self, checkpoint: Any) -> None:
        bank, sup, facts, subjects, self.alpha, self.gate_alpha, self.gate_from, self.reference_distance = checkpoint
        self.bank.restore(bank)
        self.superseded_by, self.facts, self.subjects = dict(sup), dict(facts), dict(subjects)
        self._gate_cache = None


def _whitening(keys: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, projection) mapping keys to standardized, whitened principal components of `keys`.

    Each dimension is standardized, then projected onto the top `dims` principal directions (at most a quarter of
    len(keys): whitened onto as many directions as there are keys, n points sit at the corners of a simplex, every
    pair at the same distance, and alpha calibrated on them routes anything) and divided by their standard
    deviations; dims=0 keeps every dimension standardized.
    """
    center = keys.mean(dim=0)
    std = keys.std(dim=0)
    scale = 1.0 / (std + 1e-3 * std.mean())
    if dims == 0:
        return center, torch.diag(scale)
    z = (keys - center) * scale
    _, sv, vh = torch.linalg.svd(z, full_matrices=False)
    k = max(1, min(dims, keys.shape[0] // 4, keys.shape[1]))
    sd = (sv[:k] / math.sqrt(max(1, keys.shape[0] - 1))).clamp_min(1e-6 * float(sv[0]))
    return center, scale[:, None] * vh[:k].T / sd


def _paraphrase_whitening(keys: torch.Tensor, group: torch.Tensor, dims: int,
                          shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, projection) whitening away how one fact's paraphrases vary: keys are standardized and reduced to
    their top 4 x `dims` principal directions (at most half as many as keys: the within-group covariance of every
    dimension would be singular), then whitened by the within-group covariance (the spread of a group's texts
    around their mean; shrunk by `shrinkage` towards its mean variance). Directions in which paraphrases of one
    fact differ (wording) shrink; directions in which they agree (the fact) grow. Every direction is kept: picking
    the few that best separate the calibration groups' means (a full linear discriminant) fitted the calibration
    subjects and generalized worse on the dev world (docs/methods/sola.md)."""
    n = keys.shape[0]
    center = keys.mean(dim=0)
    std = keys.std(dim=0)
    scale = 1.0 / (std + 1e-3 * std.mean())
    _, _, vh = torch.linalg.svd((keys - center) * scale, full_matrices=False)
    p = max(1, min(4 * dims, n // 2, keys.shape[1]))
    reduce = scale[:, None] * vh[:p].T
    y = (keys - center) @ reduce
    labels, inverse, counts = group.unique(return_inverse=True, return_counts=True)
    means = torch.zeros(len(labels), p, dtype=y.dtype, device=y.device).index_add_(0, inverse, y) / counts[:, None]
    spread = y - means[inverse]
    within = spread.T @ spread / max(1, n - len(labels))
    eye = torch.eye(p, dtype=y.dtype, device=y.device)
    within = (1 - shrinkage) * within + shrinkage * eye * within.diagonal().mean()
    ev, evec = torch.linalg.eigh(within)
    return center, reduce @ (evec / ev.clamp_min(1e-8 * float(ev.max())).sqrt())


def _one_subject_pairs(subjects: list[str | None], group: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor | None:
    """Of the calibration pairs `pairs` (texts of different groups), those whose groups share a named subject: a
    prompt that names a subject and asks another of its facts, what the subject gate lets through."""
    if not any(subjects):
        return None
    codes: dict[str, int] = {}
    sid = torch.tensor([codes.setdefault(s, len(codes)) if s else -1 - i for i, s in enumerate(subjects)],
                       device=group.device)[group]
    return pairs & (sid[:, None] == sid[None, :])


def quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile of a 1-d tensor of any size (torch.quantile caps the input size)."""
    x = x.flatten().sort().values
    pos = q * (x.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, x.numel() - 1)
    return float(x[lo] + (x[hi] - x[lo]) * (pos - lo))


def _before_eos(ids: torch.Tensor, eos: int | None, start: int) -> torch.Tensor:
    """[B, T] mask of the positions before each row's first eos after the `start` given tokens."""
    if eos is None:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = ids == eos
    is_eos[:, :start] = False
    return is_eos.long().cumsum(1) == 0


