"""`editbank bench`: methods x stream lengths x seeds in one resumable run directory, with tables and plots."""

from .config import BenchConfig, BenchError
from .run import run_bench

__all__ = ["BenchConfig", "BenchError", "run_bench"]
