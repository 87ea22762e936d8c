"""Target optimisation: the residual a layer should output at the subject's last token (ROME's compute_v).

z = h + δ, where h is the layer's output at the subject's last token of the plain prompt and δ (one per request)
makes the target likely after every context prefix, while a KL term on "{subject} is a" keeps what the model says
about the subject otherwise (measured at the KL prompt's lookup position, the subject's last token, as the
reference does; with fact_token="last" at its last token, which is then not patched), and a weight decay keeps δ
small; ‖δ‖ is clamped to clamp_norm_factor × ‖h‖. With target_norms="reference" the decay is
v_weight_decay·‖δ‖/‖h_ref‖² and the clamp clamp_norm_factor·‖h_ref‖, as in kmeng01/rome and memit (h_ref:
`norm_ref`, ROME's MLP output; else h); ours is v_weight_decay·‖δ‖²/‖h‖².
With a `transfer` function (MetaKE) δ is the planned residual D and every row, the KL rows included, is patched
with what the write would realise at that row's key (D·T + B, (T, B) = transfer(rows)), instead of δ itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...models.hooks import patch
from ...requests import EditRequest
from ...tokens import batch_from_ids, pad_id, pair_ids
from ..fit import fit
from .keys import lookup_rows, read_at, subject_last_index

# (token ids of each row, patched position of each row) -> (T [n requests, rows], B [rows, hidden] or None): row j
# gets Σ_i D_i T[i, j] + B[j] (B: what the write does there whatever D is, MetaKE's norm-control pull)
TransferFn = Callable[[list[list[int]], list[int]], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class TargetResult:
    """Per request: h (the layer output now), δ (the learned delta), the final NLL, and steps taken."""

    h: torch.Tensor
    delta: torch.Tensor
    nll: list[float]
    steps: int


def _rows(tokenizer, requests: list[EditRequest], prefixes: list[str], fact_token: str = "subject_last"):
    """Teacher-forcing rows (prefix+prompt, target) then KL rows ("{subject} is a"), with lookup positions."""
    rows, index, owner = [], [], []
    for r, req in enumerate(requests):
        for prefix in prefixes:
            subject = req.subject if fact_token == "subject_last" else None
            ids, i = subject_last_index(tokenizer, prefix, req.prompt, subject)
            _, tgt = pair_ids(tokenizer, prefix + req.prompt, req.target)
            rows.append((ids, tgt))
            index.append(i)
            owner.append(r)
    n_nll = len(rows)
    for r, req in enumerate(requests):
        subject = req.subject or req.prompt
        ids, i = subject_last_index(tokenizer, "", f"{subject} is a", subject if fact_token == "subject_last" else None)
        rows.append((ids, []))
        index.append(i)
        owner.append(r)
    return rows, index, owner, n_nll


def decay_term(delta: torch.Tensor, h: torch.Tensor, ref: torch.Tensor | None, reference: bool) -> torch.Tensor:
    """Σ_r ‖δ_r‖/‖ref_r‖² (the reference's form; ref defaults to h) or Σ_r ‖δ_r‖²/‖h_r‖² (ours)."""
    if reference:
        return (delta.norm(dim=1) / (h if ref is None else ref).norm(dim=1).clamp(min=1e-6) ** 2).sum()
    return (delta.norm(dim=1) ** 2 / h.norm(dim=1).clamp(min=1e-6) ** 2).sum()


def kl_positions(tokenizer, requests: list[EditRequest], fact_token: str) -> list[int]:
    """Where each request's KL prompt ("{subject} is a") is read: its lookup position (the subject's last token, as
    the reference reads it) with fact_token="subject_last", its last token with "last"."""
    return _rows(tokenizer, requests, [], fact_token)[1]


def optimize_targets(model, tokenizer, layer_path: str, requests: list[EditRequest], prefixes: list[str], hp,
                     transfer: TransferFn | None = None, max_norm_factor: float = 1.0,
                     norm_ref: torch.Tensor | None = None) -> TargetResult:
    """Learn δ per request at the output of `layer_path` (Adam on NLL + KL + weight decay, with a norm clamp)."""
    device = next(model.parameters()).device
    n = len(requests)
    h = read_at(model, tokenizer, layer_path, lookup_rows(tokenizer, requests, [""], hp.fact_token), n, inputs=False)
    rows, index, owner, n_nll = _rows(tokenizer, requests, prefixes, hp.fact_token)
    batch = batch_from_ids(rows, pad_id(tokenizer), device)
    pos = torch.tensor(index, device=device)
    row_ids = torch.arange(len(rows), device=device)
    own = torch.tensor(owner, device=device)
    kl_rows = row_ids[n_nll:]
    kl_pos = pos[n_nll:]  # the lookup position: the subject's last token, or ("last") the last token
    labels = batch.labels[:n_nll, 1:]
    mask = labels != -100
    per_row = mask.sum(1).clamp(min=1)
    rows_per_req = torch.bincount(own[:n_nll], minlength=n).clamp(min=1)

    delta = torch.zeros(n, h.shape[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    ref = (h if norm_ref is None else norm_ref).norm(dim=1).clamp(min=1e-6)
    max_norm = (max_norm_factor * hp.clamp_norm_factor * ref).unsqueeze(1)
    kl_init = None

    # with fact_token="last" the KL prompt's patched position would be the very one the KL is measured at, which
    # forbids any edit; the KL term then only applies with subject positions (or through a transfer, MetaKE)
    patched = row_ids if hp.fact_token == "subject_last" or transfer is not None else row_ids[:n_nll]
    mix, shift = transfer([r for r, _ in rows], index) if transfer is not None else (None, None)
    mix = None if mix is None else mix.float()

    def add_delta(module, inp, out):
        eff = delta[own] if mix is None else mix.T @ delta
        if shift is not None:
            eff = eff + shift.float()
        add = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        add = add.index_put((patched, pos[patched]), eff[patched])
        return out + add.to(out.dtype)

    nll = torch.full((n,), float("inf"))

    def loss_fn() -> torch.Tensor:
        nonlocal nll, kl_init
        with patch(model, layer_path, add_delta):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = logits[:n_nll, :-1].float().log_softmax(-1)
        tok_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        row_nll = -tok_lp.sum(1) / per_row
        nll = torch.zeros(n, device=device).index_add(0, own[:n_nll], row_nll) / rows_per_req
        kl_logp = logits[kl_rows, kl_pos].float().log_softmax(-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        decay = decay_term(delta, h, norm_ref, hp.target_norms == "reference")
        return nll.sum() + hp.kl_factor * kl + hp.v_weight_decay * decay

    @torch.no_grad()
    def clamp() -> None:
        delta.mul_((max_norm / delta.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))

    done = fit(loss_fn, opt, hp.v_num_grad_steps, what="target optimisation",
               done=lambda _: bool((nll.detach() < hp.v_stop_loss).all()), after_step=clamp)
    return TargetResult(h, delta.detach(), [float(x) for x in nll.detach()], done.steps)
