"""Console progress for the slow parts of a run that print nothing else while they work.

- :class:`Progress`: a pass over data (an evaluation, pseudo-labelling the unlabeled pool)
  logs `done/total, rate, ETA` every `every_s` seconds once it has run `after_s` seconds,
  and a closing line with its duration; a pass shorter than `after_s` stays silent.
- :class:`LogCompilation`: the first call of a jitted step (tracing and XLA compilation,
  which can take minutes for a large model) logs when it starts and how long it took.

Lines go through absl logging, like the training lines of `metrics_io`, from process 0.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Rate-limited progress lines for one pass.

    Args:
      desc: what the pass does, e.g. 'Evaluation (test)'.
      total: units the pass will process; None when unknown (no percentage or ETA).
      unit: what is counted ('batches', 'images').
      after_s: silent for passes shorter than this.
      every_s: at most one line per this many seconds.
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = 'batches', *,
                 after_s: float = 5.0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.start = clock()
        self.done = 0
        self.lines = 0
        self._last = -float('inf')
        self._main = jax.process_index() == 0

    def update(self, n: int = 1, wait: Any = None) -> None:
        """Counts `n` more units. `wait`: arrays whose computation the count stands for;
        they are waited on before a line is logged, so asynchronous dispatch running ahead
        of the device does not inflate the reported progress."""
        self.done += n
        now = self.clock()
        if now - self.start < self.after_s or now - self._last < self.every_s:
            return
        if wait is not None:
            jax.block_until_ready(wait)
            now = self.clock()
        self._last = now
        self.lines += 1
        if self._main:
            logging.info('%s', self.describe(now))

    def describe(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f'{self.desc}: {self.done:,}']
        if self.total and self.done <= self.total:
            parts[0] += f'/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)'
        else:
            parts[0] += f' {self.unit}'
        parts.append(f'{rate:.1f} {self.unit}/s')
        parts.append(f'{_duration(elapsed)} elapsed')
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f'ETA {_duration((self.total - self.done) / rate)}')
        return ' | '.join(parts)

    def close(self) -> None:
        """Logs the pass's duration, if it was long enough to log anything."""
        elapsed = self.clock() - self.start
        if elapsed >= self.after_s and self._main:
            logging.info('%s: done, %s %s in %s.', self.desc, f'{self.done:,}', self.unit,
                         _duration(elapsed))


class LogCompilation:
    """Wraps a jitted function to log its first call: tracing plus XLA compilation.

    The first call of a `jax.jit` function traces and compiles it before dispatching
    (the dispatch itself is asynchronous), so its duration is the compile time. Every
    other attribute (`lower`, `_cache_size`, ...) is the wrapped function's.
    """

    def __init__(self, fn: Callable, what: str):
        self._fn = fn
        self._what = what
        self._compiled = False

    def __call__(self, *args, **kwargs):
        if self._compiled:
            return self._fn(*args, **kwargs)
        main = jax.process_index() == 0
        if main:
            logging.info('Compiling the %s (the first step waits for it)...', self._what)
        start = time.monotonic()
        out = self._fn(*args, **kwargs)
        self._compiled = True
        if main:
            logging.info('Compiled the %s in %.1f s.', self._what, time.monotonic() - start)
        return out

    def __getattr__(self, name: str):
        return getattr(self._fn, name)
