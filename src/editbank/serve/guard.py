"""One lock around the model: completions and edits never interleave, so a completion sees a whole state."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """The model stayed held (by an edit) longer than a reader waits."""


class ModelGuard:
    """Serialises every use of the editor (the model, its routing state and the store).

    Readers wait at most `read_timeout` seconds and then get `Busy` (HTTP 503 with Retry-After); writers (edits,
    undos) wait their turn, so edits apply one at a time in arrival order of the lock.
    """

    def __init__(self, read_timeout: float = 10.0, write_timeout: float = 600.0) -> None:
        self._lock = threading.Lock()
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self.writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self.read_timeout):
            raise Busy("the model is busy applying an edit; retry shortly")
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def write(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self.write_timeout):
            raise Busy("another edit is still being applied; retry shortly")
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
            self._lock.release()
