"""The locks around the model: a completion sees a whole state (before or after an edit, never during one).

Edits run one at a time (the edit lock). An edit's heavy part, where the method can compute it without changing
what readers see (`Method.trains_beside_readers`: SoLA and GRACE train against the frozen base, the locate methods
write private copies of their weights), runs while completions go on; only installing it (and the store
transaction, and the check that it took) holds the model lock, briefly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """The model stayed held (by an edit) longer than a reader waits."""


class ModelGuard:
    """Serialises every use of the model and its routing state against the edits that change them.

    Readers wait at most `read_timeout` seconds for the model lock and then get `Busy` (HTTP 503 with
    Retry-After); writers (edits, undos) wait their turn for the edit lock, so edits apply one at a time in arrival
    order of the lock, and hold the model lock only inside `write()`.
    """

    def __init__(self, read_timeout: float = 10.0, write_timeout: float = 600.0) -> None:
        self._lock = threading.Lock()
        self._edits = threading.Lock()
        self.read_timeout, self.write_timeout = read_timeout, write_timeout

    @property
    def writing(self) -> bool:
        """An edit or undo is in progress (computing or installing)."""
        return self._edits.locked()

    def read(self):
        return _held(self._lock, self.read_timeout, "the model is busy applying an edit; retry shortly")

    def editing(self):
        """One edit or undo at a time; readers go on until the block enters `write()`."""
        return _held(self._edits, self.write_timeout, "another edit is still being applied; retry shortly")

    def write(self):
        """The model to this thread alone (inside `editing()`)."""
        return _held(self._lock, self.write_timeout, "the model stayed busy; retry shortly")


@contextmanager
def _held(lock: threading.Lock, timeout: float, busy: str) -> Iterator[None]:
    """Hold `lock` for the block; `Busy(busy)` if it cannot be had within `timeout` seconds."""
    if not lock.acquire(timeout=timeout):
        raise Busy(busy)
    try:
        yield
    finally:
        lock.release()
