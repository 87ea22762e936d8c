"""Shared fixtures: the small world (built once, cached) and tiny random models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
