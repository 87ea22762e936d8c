"""Plain-PyTorch training of the world model on its (prompt, answer) sequences."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editbank.tokens import prompt_ids, target_ids

from .accuracy import accuracy, exact_match_flags
from .spec import TrainSpec


@dataclass
class TrainResult:
    """What training did: steps run, final loss, train exact match (when evaluated), seconds."""

    steps: int
    loss: float
    train_accuracy: float | None
    seconds: float


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, L], answer mask [N, L] (answer + EOS tokens) and lengths [N]."""
    seqs, answer = [], []
    for prompt, target in pairs:
        p = prompt_ids(tokenizer, prompt)
        t = target_ids(tokenizer, target) + [tokenizer.eos_token_id]
        seqs.append(p + t)
        answer.append([0] * len(p) + [1] * len(t))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    amask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, a) in enumerate(zip(seqs, answer)):
        ids[i, : len(s)] = torch.tensor(s)
        amask[i, : len(a)] = torch.tensor(a, dtype=torch.bool)
    return ids, amask, torch.tensor([len(s) for s in seqs])


def lr_at(step: int, cfg: TrainSpec) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _progress(enabled: bool):
    """A rich progress bar for training (steps, loss), or nothing."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]training world model"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        transient=False,
        console=Console(stderr=True),  # stdout stays the command's result (`editbank world build` prints a path)
    )


def train_model(
    model, tokenizer, pairs: list[tuple[str, str]], cfg: TrainSpec, seed: int, progress: bool = False
) -> TrainResult:
    """Train `model` in place with AdamW on `pairs`; loss on answer tokens (+ `sequence_loss` x the rest)."""
    start = time.perf_counter()
    ids, amask, lengths = encode_pairs(tokenizer, pairs)
    n = ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    order = torch.randperm(n, generator=gen)
    pos, step, loss_ema, acc = 0, 0, float("nan"), None
    bs = min(cfg.batch_size, n)
    with _progress(progress) as bar:
        task = bar.add_task("train", total=cfg.steps, loss="-") if bar is not None else None
        while step < cfg.steps:
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + bs]
            pos += bs
            width = int(lengths[idx].max())
            x = ids[idx, :width]
            hidden = model.model(input_ids=x).last_hidden_state[:, :-1]
            gold = x[:, 1:]
            ans = amask[idx, 1:width]
            logits = model.lm_head(hidden[ans])
            loss = F.cross_entropy(logits, gold[ans])
            if cfg.sequence_loss > 0:
                rest = ~ans & (torch.arange(1, width) < lengths[idx, None])
                loss = loss + cfg.sequence_loss * F.cross_entropy(model.lm_head(hidden[rest]), gold[rest])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            lv = float(loss.detach())
            loss_ema = lv if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * lv
            if bar is not None and (step % 10 == 0 or step == cfg.steps):
                bar.update(task, completed=step, loss=f"{loss_ema:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                acc = accuracy(exact_match_flags(model, tokenizer, pairs))
                model.train()
                if acc >= cfg.stop_at:
                    if bar is not None:
                        bar.update(task, completed=cfg.steps, loss=f"{loss_ema:.4f} (all facts known)")
                    break
    model.eval()
    return TrainResult(step, loss_ema, acc, time.perf_counter() - start)
