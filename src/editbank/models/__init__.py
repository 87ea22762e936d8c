"""Model access: architecture registry, loading/fingerprinting, and context-managed hooks."""

from editbank.models.hooks import Trace, forward_hooks, frozen_prefix, patch, trace
from editbank.models.loading import load_model, model_fingerprint, resolve_dtype
from editbank.models.registry import Arch, ArchSpec, arch_of, register_arch, supported_types

__all__ = [
    "Arch",
    "ArchSpec",
    "Trace",
    "arch_of",
    "forward_hooks",
    "frozen_prefix",
    "load_model",
    "model_fingerprint",
    "patch",
    "register_arch",
    "resolve_dtype",
    "supported_types",
    "trace",
]
