"""Shared fixtures: the small world (built once per run) and tiny random models.

The suite never writes into the user's cache: `pytest_configure` points EDITBANK_CACHE (worlds, statistics) at a
temporary folder for the run (subprocesses the tests start inherit it), removed at the end. Set
EDITBANK_TEST_CACHE=DIR to keep one between runs instead (the small world then builds once).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
_TEMP_CACHE: str | None = None


def pytest_configure(config) -> None:
    global _TEMP_CACHE
    keep = os.environ.get("EDITBANK_TEST_CACHE")
    if keep:
        os.environ["EDITBANK_CACHE"] = keep
    else:
        _TEMP_CACHE = tempfile.mkdtemp(prefix="editbank-test-cache-")
        os.environ["EDITBANK_CACHE"] = _TEMP_CACHE


def pytest_unconfigure(config) -> None:
    if _TEMP_CACHE:
        shutil.rmtree(_TEMP_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def small_world():
    from editbank import World

    return World.build("small", progress=False)


@pytest.fixture(scope="session")
def world_requests(small_world):
    return small_world.edit_requests(n=20, seed=0)


@pytest.fixture
def world_model(small_world):
    """A fresh copy of the small world's model and tokenizer for one test."""
    from editbank import load_model

    return load_model(small_world.path)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest single-threaded; two threads on two busy cores are ~100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
