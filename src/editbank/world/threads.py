"""Pick the faster torch thread count while training (busy 2-core machines punish multi-threading)."""

from __future__ import annotations

import os
import time

import torch

ENV_THREADS = "EDITBANK_WORLD_THREADS"


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class ThreadPicker:
    """Times short windows of steps at 1 and at N threads, keeps the faster one, and re-checks regularly.

    Tiny models gain ~1.5x from a second thread on an idle 2-core machine but run 3-4x slower when
    another process holds a core, so the choice is measured rather than assumed. Thread counts do
    not change the arithmetic of CPU kernels here (checked bitwise), so training stays deterministic.
    Set $EDITBANK_WORLD_THREADS to force a count.
    """

    def __init__(self, window: int = 8, recheck: int = 160) -> None:
        forced = os.environ.get(ENV_THREADS, "").strip()
        most = int(forced) if forced.isdigit() and int(forced) > 0 else min(available_cores(), 4)
        self.options = [most] if forced or most == 1 else [most, 1]
        self.window, self.recheck = window, max(recheck, window * len(self.options) + 1)
        self.best = self.options[0]
        self._times: dict[int, list[float]] = {}
        self._current = 0
        self._start = 0.0
        self.steps_at: dict[int, int] = {}

    def _threads_for(self, step: int) -> int:
        c = step % self.recheck
        if len(self.options) > 1 and c < self.window * len(self.options):
            return self.options[c // self.window]
        return self.best

    def begin(self, step: int) -> None:
        """Call before a training step."""
        n = self._threads_for(step)
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n
        self._start = time.perf_counter()

    def end(self, step: int) -> None:
        """Call after a training step."""
        took = time.perf_counter() - self._start
        n = self._current
        self.steps_at[n] = self.steps_at.get(n, 0) + 1
        c = step % self.recheck
        trial = len(self.options) > 1 and c < self.window * len(self.options)
        if trial and c % self.window:  # the first step of a window pays for the switch
            self._times.setdefault(n, []).append(took)
        if trial and c == self.window * len(self.options) - 1:
            means = {k: sum(v) / len(v) for k, v in self._times.items() if v}
            self.best = min(means, key=means.get) if means else self.best
            self._times.clear()
