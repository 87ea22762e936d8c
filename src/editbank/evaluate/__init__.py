"""Evaluation: per-request metrics with protocol tags, lifelong streams and rollback."""

from .lifelong import rollback_eval, run_stream
from .metrics import PROTOCOLS, evaluate, ngram_entropy

__all__ = ["PROTOCOLS", "evaluate", "ngram_entropy", "rollback_eval", "run_stream"]
