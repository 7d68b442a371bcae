"""A run's workdir: one run at a time, the config of every start, no stale results.

`open_run(workdir, config)` is the context every trainer runs in:

- **Lock.** `<workdir>/lock.json` (host, pid, start time, command), created atomically.
  A second run on the same workdir stops at once naming the holder; a lock left by a
  process that no longer runs on this host is taken over with a warning (a lock from
  another host is never taken over: remove it by hand once that run is gone). With
  several processes, process 0 takes it and the others learn the outcome from it.
- **Config history.** `config.json` is the latest start's config; every start also
  keeps its own in `history/config.<start step>.json`. A start on a workdir that already
  holds checkpoints compares its config with the previous one: a change of a field that
  breaks exact resumption (model, data, batch size, seed, augmentation, ...;
  `configuration.REPLAY_FIELDS`) is refused with the list of changed fields unless the
  run allows it (`train.py --allow_config_change`); harmless changes (run length, log,
  eval and checkpoint cadence) are logged.
- **Results.** A `results.json` of an earlier completion is moved to
  `history/results.<its step>.json` when a run starts, so a continuation that then fails
  never leaves an old result looking like its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from flaxnets_errors import ConfigError, UserError
from trainers import configuration

LOCK_FILE = 'lock.json'
HISTORY_DIR = 'history'


class WorkdirLockedError(UserError, RuntimeError):
    """Another run holds the workdir."""


class ConfigChangedError(ConfigError):
    """A resume changed fields that break exact resumption."""


@dataclasses.dataclass
class RunOptions:
    """Choices made on the command line rather than in the config."""

    allow_config_change: bool = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('start_time')} ({holder.get('command', '')[:120]})")


def acquire_lock(workdir: str) -> str:
    """Creates the lock file or raises WorkdirLockedError; returns its path."""
    path = os.path.join(workdir, LOCK_FILE)
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'start_time': datetime.datetime.now().isoformat(timespec='seconds'),
          'command': ' '.join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            if holder.get('host') == me['host'] and holder.get('pid') and not _pid_alive(int(holder['pid'])):
                logging.warning('Taking over the lock of %s: that process no longer runs (it '
                                'was killed or crashed).', _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if not holder:
                raise WorkdirLockedError(
                    f'{path} exists but cannot be read: another run may be starting on this '
                    f'workdir. If none is, remove the file and start again.') from None
            raise WorkdirLockedError(
                f'The workdir {workdir} is in use by another run: {_describe(holder)}. Wait for '
                f'it to finish or stop it, or use another --workdir. (If that run is gone, '
                f'remove {path}.)') from None
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f, indent=1)
        return path
    raise WorkdirLockedError(f'Could not take the lock {path}; another run keeps creating it.')


def release_lock(path: str) -> None:
    try:
        with open(path) as f:
            holder = json.load(f)
        if holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
            os.remove(path)
    except (OSError, ValueError):
        pass


def _has_checkpoints(workdir: str) -> bool:
    """True when any checkpoints folder below the workdir (three levels, e.g. Noisy
    Student's `round_0/student/checkpoints`) holds a step."""
    for root, dirs, _ in os.walk(workdir):
        if root[len(workdir):].count(os.sep) > 3:
            dirs[:] = []
            continue
        if os.path.basename(root) in ('checkpoints', 'finetune_checkpoints'):
            if any(d.isdigit() for d in dirs):
                return True
            dirs[:] = []
    return False


def _newest_step(workdir: str) -> int:
    steps = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()] \
        if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
    return max(steps, default=0)


def _unique(path: str) -> str:
    stem, ext = os.path.splitext(path)
    k, out = 1, path
    while os.path.exists(out):
        out, k = f'{stem}.{k}{ext}', k + 1
    return out


def check_config_change(workdir: str, config: ml_collections.ConfigDict, options: RunOptions) -> None:
    """Refuses a resume that changes REPLAY_FIELDS (unless allowed); logs harmless changes."""
    path = os.path.join(workdir, 'config.json')
    if not (os.path.exists(path) and _has_checkpoints(workdir)):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        logging.warning('%s is unreadable; the config change check is skipped.', path)
        return
    new = json.loads(config.to_json_best_effort())
    harmful = configuration.changed_fields(old, new, configuration.REPLAY_FIELDS)
    harmless = configuration.changed_fields(old, new, configuration.HARMLESS_FIELDS)
    if harmless:
        logging.info('Resuming with changed %s.', ', '.join(
            f'{k} ({_lookup(old, k)!r} -> {_lookup(new, k)!r})' for k in harmless))
    if not harmful:
        return
    listed = ', '.join(f'{k} ({_lookup(old, k)!r} -> {_lookup(new, k)!r})' for k in harmful)
    if options.allow_config_change:
        logging.warning('Resuming with changed %s (allowed by --allow_config_change): the run is '
                        'no longer an exact continuation.', listed)
        return
    raise ConfigChangedError(
        f'This workdir holds checkpoints of a run with another config; changed: {listed}. '
        f'Resuming with these changes would not continue that run exactly. Use a new --workdir, '
        f'or pass --allow_config_change to resume anyway (the earlier configs stay in '
        f'{os.path.join(workdir, HISTORY_DIR)}).')


def _lookup(d: dict, dotted: str):
    for part in dotted.split('.'):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def record_start(workdir: str, config: ml_collections.ConfigDict, class_names) -> None:
    """Writes config.json (latest) and history/config.<step>.json, labels.json, and moves
    an earlier results.json into history/."""
    history = os.path.join(workdir, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    step = _newest_step(workdir)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    for target in (_unique(os.path.join(history, f'config.{step}.json')), os.path.join(workdir, 'config.json')):
        tmp = target + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, target)
    if class_names:
        with open(os.path.join(workdir, 'labels.json'), 'w') as f:
            json.dump(list(class_names), f, indent=1)
    results = os.path.join(workdir, 'results.json')
    if os.path.exists(results):
        try:
            with open(results) as f:
                done = json.load(f).get('step', 'unknown')
        except (OSError, ValueError, AttributeError):
            done = 'unknown'
        os.replace(results, _unique(os.path.join(history, f'results.{done}.json')))


def _broadcast_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def open_run(workdir: str, config: ml_collections.ConfigDict, class_names=None,
             options: RunOptions | None = None) -> Iterator[None]:
    """Locks the workdir, checks and records the config, and unlocks at the end."""
    options = options or RunOptions()
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f'--workdir {workdir} exists and is not a directory.')
    main = jax.process_index() == 0
    lock, error = None, None
    if main:
        try:
            os.makedirs(workdir, exist_ok=True)
            lock = acquire_lock(workdir)
            check_config_change(workdir, config, options)
            record_start(workdir, config, class_names)
        except UserError as e:
            error = e
    if not _broadcast_ok(error is None):
        if lock:
            release_lock(lock)
        raise error or WorkdirLockedError(
            f'Process 0 could not start the run in {workdir}; its log says why.')
    try:
        yield
    finally:
        if lock:
            release_lock(lock)
