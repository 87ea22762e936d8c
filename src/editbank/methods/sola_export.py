"""SoLA's bank as standard PEFT LoRA adapters (one folder per active edit) plus its router, for serving engines.

An engine that serves many LoRA adapters by name (vLLM `--enable-lora`, LoRAX, S-LoRA) cannot route by content;
SoLA is exactly "one LoRA per edit plus a router". The export writes, in the folder:
- `<edit id>/adapter_config.json` + `adapter_model.safetensors`: a PEFT LoRA (r = SoLA's rank, lora_alpha = rank x
  lora_scale so PEFT's scaling lora_alpha / r is SoLA's scale) on exactly SoLA's modules (full module names);
  `peft.PeftModel.from_pretrained(base, folder / str(id))` answers a routed prompt as editbank's edited model does;
- `router.safetensors` (`keys` [N, D], the raw keys; `edit_ids` [N]; `center` and, when whitening is on,
  `projection`) and `router.json` (how to compute a query and compare it: the key (the input of `key_module` at the
  last prompt token and/or the output of `embedding_module` averaged over the prompt, by the base model with no
  adapter), the transform, the distance, alpha, and with the subject gate `gate`: each gated edit's subject as token
  id sequences and the gate's threshold). A prompt routes to edit `edit_ids[j*]` where j* is its nearest key among
  those it may route to (an ungated edit's always; a gated edit's when one of its subject's token sequences occurs
  in the prompt's ids), if that distance is below the key's threshold (alpha; a gated key's: gate alpha); otherwise
  the base model (no adapter) answers. `editbank route` and `POST /v1/route` compute the same decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROUTER_FORMAT = "editbank-sola-router/2"  # /2: the subject gate (`gate`); /1 had none
ROUTER_FORMAT_SPAN = "editbank-sola-router/3"  # /3: gated keys read from the subject's sentence (`key_span`)


KEY_TEXT = {
    "last": "input of key_module at the last prompt token, base model, no adapter",
    "pooled": "output of embedding_module averaged over the prompt's tokens",
    "last+pooled": "input of key_module at the last prompt token, base model, no adapter, followed by the output of "
                   "embedding_module averaged over the prompt's tokens (one vector, concatenated)",
}


def _name_of(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def export_peft(method, folder: str | Path, base_model: str | None = None) -> list[int]:
    """Write every active edit of a SoLA method as a PEFT LoRA adapter and the router; returns the edit ids."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    if method.alpha is None:
        raise ValueError("the SoLA bank has no calibration yet (no edit was ever made): nothing to export")
    bank, hp = method.bank, method.hparams
    active = [eid for eid, slot in sorted(bank.slot_of.items()) if torch.isfinite(bank.offset[slot])]
    transposed = [method.arch.weight_out_in(m) is not m.weight for m in method.modules]
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": hp.rank, "lora_alpha": hp.rank * hp.lora_scale,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(method.paths), "fan_in_fan_out": any(transposed),
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": base_model,
    }
    try:
        _write(method, out, active, config, base_model)
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # no half-written export
        raise
    return active


def _write(method, out: Path, active: list[int], config: dict[str, Any], base_model: str | None) -> None:
    bank, hp = method.bank, method.hparams
    keys, index_keys = [], []
    for eid in active:
        key, A, B = bank.lora(eid)
        keys.append(key.float().cpu())
        index_keys.append(bank.index_keys[bank.slot_of[eid]].float().cpu())
        tensors = {}
        for path, a, b in zip(method.paths, A, B):
            tensors[f"base_model.model.{path}.lora_A.weight"] = a.float().cpu().contiguous()
            tensors[f"base_model.model.{path}.lora_B.weight"] = b.float().cpu().contiguous()
        d = out / str(eid)
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    router: dict[str, torch.Tensor] = {
        "keys": torch.stack(keys) if keys else torch.zeros(0, bank.key_dim),
        # the keys as compared: transformed (and unit-norm for cosine), index_dim wide instead of the module's input
        "index_keys": torch.stack(index_keys) if index_keys else torch.zeros(0, bank.index_dim),
        "edit_ids": torch.tensor(active, dtype=torch.int64),
        "center": bank.center.float().cpu(),
    }
    if bank.projection is not None:
        router["projection"] = bank.projection.float().cpu()
    save_file(router, str(out / "router.safetensors"))
    info: dict[str, Any] = {
        "format": ROUTER_FORMAT if hp.key_span == "prompt" else ROUTER_FORMAT_SPAN, "key_module": method.paths[0],
        "key": KEY_TEXT[hp.key],
        "embedding_module": _name_of(method.model, method.embeddings),
        "transform": "(key - center) @ projection" if bank.projection is not None else "key - center",
        "distance": hp.distance,
        "compare": ("1 - cos(transform(query), transform(key)) < alpha" if hp.distance == "cosine"
                    else "|transform(query) - transform(key)| < alpha") + " (gate alpha for a gated key: see gate)",
        "alpha": method.alpha, "edits": active,
        "adapter_folders": "one per edit, named by its id", "base_model": base_model, "gate": _gate(method, active),
    }
    (out / "router.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def _gate(method, active: list[int]) -> dict[str, Any] | None:
    """The subject gate as data: each gated edit's subject token sequences, and its threshold."""
    if method._gate() is None:
        return None
    subjects = {eid: method.subjects[eid] for eid in active if eid in method.subjects}
    return {
        "rule": "a gated edit's key is a candidate only for prompts whose token ids (with the tokenizer's special "
                "tokens) contain one of its subject's sequences; its threshold is gate alpha instead of alpha",
        "alpha": method.gate_alpha,
        "key_span": method.hparams.key_span,
        "span_rule": "with key_span 'sentence', a gated key is read from the prompt's text cut to the sentence that "
                     "names the subject (after the last '. ', '? ', '! ' or new line before its last mention), alone, "
                     "when something comes before that sentence; the prompt's query against that key likewise",
        "subjects": {str(e): s for e, s in subjects.items()},
        "forms": {str(e): sorted(list(f) for f in method.subject_forms(s)) for e, s in subjects.items()},
    }
