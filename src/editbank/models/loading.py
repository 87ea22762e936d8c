"""Load a causal LM + tokenizer from a local checkpoint or take already-built objects.

editbank never downloads: paths must be existing local directories (everything is loaded with
`local_files_only=True`), so a typo fails fast instead of silently hitting the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """Normalise a dtype given as torch.dtype, a name ("bfloat16", "float32", ...), "auto" or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def _local_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist; editbank loads local checkpoints only "
            "(download the model yourself, e.g. with `huggingface-cli download`, and pass its directory)"
        )
    if not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory; pass a checkpoint directory")
    return p


def _load_tokenizer(tokenizer: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        path = _local_dir(tokenizer, "tokenizer path")
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return tokenizer


def _prepare_tokenizer(tokenizer: Any, padding_side: str) -> Any:
    if getattr(tokenizer, "pad_token", None) is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    model_or_path: str | os.PathLike | nn.Module,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    padding_side: str = "right",
) -> tuple[nn.Module, Any]:
    """Return (model in eval mode, tokenizer with a pad token) from a local directory or built objects.

    `tokenizer` may be a tokenizer object or a local path; it defaults to the model directory and is
    required when `model_or_path` is a model object. `dtype` None keeps transformers' default (the
    checkpoint's dtype in transformers 5). `device_map` goes to `from_pretrained` (accelerate) and
    excludes `device`.
    """
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    torch_dtype = resolve_dtype(dtype)
    if isinstance(model_or_path, nn.Module):
        if tokenizer is None:
            raise TypeError("load_model(model, tokenizer): a tokenizer is required with a model object")
        if device_map is not None:
            raise ValueError("device_map applies only when loading from a path")
        model = model_or_path
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    elif isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        path = _local_dir(model_or_path, "model path")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} has no config.json; it is not a transformers checkpoint")
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = path if tokenizer is None else tokenizer
    else:
        raise TypeError(f"expected a model object or a local path, got {type(model_or_path).__name__}")
    tokenizer = _prepare_tokenizer(_load_tokenizer(tokenizer, trust_remote_code), padding_side)
    if device is not None:
        model = model.to(device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


_CHUNK = 1 << 20
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _param_digest(p: torch.Tensor, n: int = 256) -> bytes:
    """Cheap, device-independent content sample: first/last n values and an exact bit-pattern sum."""
    if p.device.type == "meta":  # offloaded by accelerate: content not resident, shape only
        return b"meta"
    flat = p.detach().reshape(-1)
    bits = flat.view(_INT_VIEW.get(flat.element_size(), torch.uint8)) if flat.is_floating_point() else flat
    # Integer addition is associative, so this sum is bit-identical on every device and reduction order.
    # Chunks keep the int64 temporaries small (cache-friendly on CPU, no big allocation on GPU).
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHUNK):
        total += bits[start : start + _CHUNK].sum(dtype=torch.int64)
    checksum = int(total)
    sample = torch.cat([flat[:n], flat[-n:]]).cpu()
    if sample.is_floating_point():  # bytes, since numpy has no bfloat16
        sample = sample.view(torch.uint8)
    return checksum.to_bytes(8, "little", signed=True) + sample.numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """Stable sha256 hex digest of the weights (type, names, shapes, dtypes and a content sample).

    Fast on 7B models (one pass of integer sums, no copies to CPU) and identical across reloads and
    devices; any changed weight element changes the bit-pattern checksum of its parameter.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "model_type", type(model).__name__)).encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"|{name}:{tuple(p.shape)}:{p.dtype}|".encode())
        if p.numel():
            h.update(_param_digest(p))
    return h.hexdigest()
