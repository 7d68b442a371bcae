"""The one training loop: every trainer's steps run here.

A trainer builds a :class:`Phase` (its jitted step function, its initial state, a
function that gives its batches from any step on, its evaluation and its checkpointer)
and calls :func:`run`. The loop owns everything between the steps, once for all trainers:

- resume: the newest checkpoint that restores; a damaged one is moved aside (renamed to
  `damaged-<step>-<time>`, never deleted) and the next older one tried;
- dispatch with no host sync: metrics stay on the device until a log step;
- the non-finite guard: a NaN/inf loss or gradient stops the run, nothing saved after it;
- metrics (`metrics.jsonl`, TensorBoard), evaluation and checkpoint cadence; a resumed
  run drops the rows past its checkpoint so no step is logged twice;
- skipped (undecodable) examples: counted in the metrics and `results.json`, and the run
  stops past `config.data.max_bad_fraction`;
- interrupts: SIGINT (Ctrl-C) and SIGTERM finish the current step, save, and raise
  :class:`RunInterrupted`, which `train.py` turns into exit status 75 (`EXIT_RESUMABLE`:
  "stopped cleanly, run the same command to resume"); a second Ctrl-C aborts at once.
  With several processes the stop is agreed at the next log step (one tiny all-gather
  there, none per step), and a cluster's preemption notice (orbax) stops them too;
- failed saves (a full disk, a lost mount): one clear error at the failed save, its
  temporary directory removed, no training past it.

A new trainer supplies a Phase and, for its results, reads :class:`Outcome`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from flaxnets_errors import UserError
from trainers import core
from trainers.checkpointing import Checkpointer, CheckpointMismatchError
from trainers.metrics_io import MetricsLogger

EXIT_RESUMABLE = 75  # sysexits.h EX_TEMPFAIL: stopped cleanly; the same command resumes


class RunInterrupted(Exception):
    """The run was interrupted (SIGINT/SIGTERM/preemption) and saved its checkpoint."""

    def __init__(self, step: int, directory: str, reason: str):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(
            f'{reason}: stopped at step {step} with a checkpoint saved in {directory}; run the '
            f'same command to resume.'
        )


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the run stopped without saving it."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (full disk, permissions, a lost mount)."""


class TooManyBadExamplesError(UserError, ValueError):
    """More undecodable examples than `config.data.max_bad_fraction` allows."""


class NoRestorableCheckpointError(UserError, RuntimeError):
    """Every checkpoint of the workdir failed to restore."""


# ----------------------------------------------------------------------------- interrupts


class Interrupts:
    """SIGINT and SIGTERM set a flag that the loop reads after each step.

    A second SIGINT raises KeyboardInterrupt at once (abort without saving). Handlers are
    installed only on the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            logging.warning('Second %s: aborting now, without saving.', name)
            raise KeyboardInterrupt
        self.reason = f'{name} received'
        logging.warning('%s received: finishing this step, saving a checkpoint, then stopping '
                        '(press Ctrl-C again to abort without saving).', name)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _agree(flag: bool) -> bool:
    """True on every process when any process's flag is set (one small all-gather)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


# ----------------------------------------------------------------------------- phases


@dataclasses.dataclass
class Phase:
    """What a trainer supplies for one stretch of training.

    Attributes:
      name: 'train', or the split of its train records ('finetune' for MPL's student).
      state: the freshly initialised state, or its abstract shapes with shardings
        (`core.StateSpec.abstract`) when `init` is given; replaced by the newest checkpoint
        when there is one.
      init: builds the fresh state when no checkpoint restores (`core.StateSpec.init`), so
        a resumed run never compiles the init program; None when `state` is concrete.
      step_fn: the jitted `(state, batch) -> (state, metrics)`; metrics hold at least
        'loss', and 'skipped' when the batches carry 'valid'.
      batches: `start_step -> iterator` of this process's host batches from that step on.
      evaluate: `(state, logged step) -> {split: metrics}`; it writes its own records.
      checkpointer: this phase's checkpoints.
      total_steps: the phase ends at this step.
      sharding: the batch sharding (`core.batch_sharding(mesh)`).
      to_ckpt / from_ckpt: between the state and the tree that is saved.
      step_offset: added to logged steps (MPL's fine-tuning continues the MPL count).
      prefetch: batches kept on the devices ahead of the step.
      global_batch_size: examples per step (for the skipped fraction).
      max_bad_fraction: the run stops past this fraction of skipped examples.
      guarded: metric keys the non-finite guard checks (those present).
    """

    name: str
    state: Any
    step_fn: Callable[[Any, dict], tuple[Any, dict]]
    batches: Callable[[int], Iterator[dict]]
    evaluate: Callable[[Any, int], dict[str, dict]]
    checkpointer: Checkpointer
    total_steps: int
    sharding: Any
    to_ckpt: Callable[[Any], Any] = lambda s: s
    from_ckpt: Callable[[Any], Any] = lambda s: s
    step_offset: int = 0
    prefetch: int = 2
    global_batch_size: int = 0
    max_bad_fraction: float = 1e-3
    guarded: tuple[str, ...] = ('loss', 'grad_norm', 'param_norm')
    init: Callable[[], Any] | None = None


@dataclasses.dataclass
class Outcome:
    state: Any
    start_step: int
    step: int
    eval_results: dict[str, dict]
    skipped_examples: int


# ----------------------------------------------------------------------------- resume


def _move_aside(ckpt: Checkpointer, step: int) -> str:
    target = os.path.join(ckpt.directory, f'damaged-{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
        os.replace(os.path.join(ckpt.directory, str(step)), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'flaxnets_move_aside_{step}')
    ckpt.manager.reload()
    return target


def restore_latest(ckpt: Checkpointer, state: Any, to_ckpt, from_ckpt) -> tuple[Any, bool]:
    """The state of the newest checkpoint that restores (and True), or `state` (False).

    A checkpoint of another model is refused (CheckpointMismatchError: the workdir is
    someone else's). One that fails to read is moved aside with the reason logged, and
    the next older one is tried; when none restores, the error lists each and why.
    """
    failures = []
    while (step := ckpt.latest_step()) is not None:
        try:
            ckpt.check_compatible(step)
            restored = from_ckpt(ckpt.restore(step, to_ckpt(state)))
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
            reason = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
            where = _move_aside(ckpt, step)
            logging.warning('Checkpoint step %d in %s does not restore (%s); moved to %s, trying '
                            'the next older one.', step, ckpt.directory, reason, where)
            failures.append(f'step {step} ({reason}; moved to {where})')
            continue
        logging.info('Resumed from %s at step %d.', ckpt.directory, step)
        return restored, True
    if failures:
        raise NoRestorableCheckpointError(
            f'No checkpoint in {ckpt.directory} restores: ' + '; '.join(failures) + '. They were '
            'moved aside, not deleted; run the same command again to start from step 0, or '
            'restore a backup of the checkpoints.'
        )
    return state, False


# ----------------------------------------------------------------------------- saving


def _remove_temporaries(directory: str) -> None:
    if jax.process_index() != 0:
        return
    for tmp in glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')):
        shutil.rmtree(tmp, ignore_errors=True)


def _write_error(ckpt: Checkpointer, step: int, error: BaseException) -> CheckpointWriteError:
    _remove_temporaries(ckpt.directory)
    try:
        free = f'{shutil.disk_usage(ckpt.directory).free / 2**20:.1f} MiB free'
    except OSError:
        free = 'free space unknown'
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, OSError) and cause.errno:
            break
        cause = cause.__cause__ or cause.__context__
    text = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
    full = any('No space left' in str(e) for e in (error, cause)) or getattr(cause, 'errno', None) == errno.ENOSPC
    what = 'No space left on device' if full else text
    return CheckpointWriteError(
        f'Saving the checkpoint of step {step} in {ckpt.directory} failed: {what} ({free}). '
        f'Training stopped at that save; the checkpoints before it are intact. Free space (or '
        f'fix the directory) and run the same command to resume from the last saved step.'
    )


def save(ckpt: Checkpointer, step: int, tree: Any) -> None:
    """Starts an asynchronous save; a failure (now or of an earlier one) stops the run."""
    finish_saves(ckpt, step)  # orbax would wait for the previous save here anyway
    try:
        ckpt.save(step, tree, force=True)
        ckpt.last_save = step
    except Exception as e:  # noqa: BLE001
        raise _write_error(ckpt, step, e) from e


def finish_saves(ckpt: Checkpointer, step: int) -> None:
    """Waits for pending saves and raises CheckpointWriteError if one failed."""
    try:
        ckpt.wait()
        ckpt.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
        raise _write_error(ckpt, getattr(ckpt, 'last_save', step), e) from e


# ----------------------------------------------------------------------------- the loop


class _Metrics:
    """Step metrics held on the device until a log step, then checked and averaged."""

    def __init__(self, phase: Phase, ckpt: Checkpointer):
        self.phase, self.ckpt = phase, ckpt
        self.pending: list[tuple[int, dict]] = []
        self.skipped = 0
        self.seen = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        if not self.pending:
            return None
        values = jax.device_get([m for _, m in self.pending])
        for (s, _), v in zip(self.pending, values, strict=True):
            bad = [k for k in self.phase.guarded if k in v and not math.isfinite(float(v[k]))]
            if bad:
                self._diverged(s, bad, v)
        self.pending = []
        means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        if 'skipped' in values[0]:
            skipped = int(round(sum(float(v['skipped']) for v in values)))
            means['skipped'] = skipped
            self.skipped += skipped
            self.seen += len(values) * self.phase.global_batch_size
            if self.seen and self.skipped / self.seen > self.phase.max_bad_fraction:
                raise TooManyBadExamplesError(
                    f'{self.skipped} of {self.seen} training examples so far could not be decoded '
                    f'({self.skipped / self.seen:.2%} > config.data.max_bad_fraction='
                    f'{self.phase.max_bad_fraction}); the log above names each file. Remove or '
                    f'replace them, or raise config.data.max_bad_fraction.'
                )
        return means

    def _diverged(self, s: int, bad: list[str], v: dict) -> None:
        self.ckpt.wait()
        good = self.ckpt.latest_step()
        where = (f'the last good checkpoint is step {good} in {self.ckpt.directory}; running the '
                 f'same command again resumes from it' if good is not None
                 else 'no checkpoint was saved before it')
        raise NonFiniteLossError(
            f'Non-finite {"/".join(bad)} ({", ".join(f"{k}={float(v[k])}" for k in bad)}) at '
            f'{"" if self.phase.name == "train" else self.phase.name + " "}step {s + 1} (training stopped; nothing was saved after the '
            f'divergence; {where}). Lower the learning rate, set config.grad_clip_norm, '
            f'lengthen warmup, or use compute_dtype float32.'
        )


def run(phase: Phase, config, logger: MetricsLogger) -> Outcome:
    """Resumes `phase` from its newest checkpoint and trains it to `total_steps`.

    Raises RunInterrupted after saving when a signal or a preemption stopped it.
    """
    ckpt, total, offset = phase.checkpointer, phase.total_steps, phase.step_offset
    state, resumed = restore_latest(ckpt, phase.state, phase.to_ckpt, phase.from_ckpt)
    if not resumed and phase.init is not None:
        state = phase.init()
    start = ckpt.latest_step() if resumed else 0
    logger.drop_after(start + offset)
    outcome = Outcome(state=state, start_step=start, step=start, eval_results={},
                      skipped_examples=logger.total('skipped', phase.name, start + offset))
    if start >= total:
        return outcome
    metrics = _Metrics(phase, ckpt)
    batches = core.prefetch_to_device(phase.batches(start), phase.sharding, size=phase.prefetch)
    step = start
    log_every, eval_every, ckpt_every = (config.log_every_steps, config.eval_every_steps,
                                         config.checkpoint_every_steps)

    def log(step: int) -> None:
        means = metrics.flush()
        if means is None:
            return
        if phase.name == 'train':
            logger.write_train(step + offset, means)
        else:
            logger.write(step + offset, phase.name, means)
            logging.info('%s step %d/%d | loss %.4g', phase.name, step, total, means['loss'])

    try:
        with Interrupts() as signals, _metrics_end_at_failed_save(ckpt, logger, offset):
            logger.mark(step + offset)
            while step < total:
                state, step_metrics = phase.step_fn(state, next(batches))
                metrics.add(step, step_metrics)
                step += 1
                if step == start + 1:
                    logger.mark(step + offset)  # throughput without the compilation
                at_log = step % log_every == 0 or step == total
                stop = signals.reason if jax.process_count() == 1 else None
                if at_log and jax.process_count() > 1 and _agree(signals.reason is not None):
                    stop = signals.reason or 'A signal on another process'
                if stop is None and jax.process_count() > 1 and ckpt.manager.reached_preemption(step):
                    stop = 'Preemption notice'
                if at_log or stop:
                    log(step)
                if step % eval_every == 0 or step == total:
                    outcome.eval_results = phase.evaluate(state, step + offset)
                if step % ckpt_every == 0 or step == total or stop:
                    metrics.flush()  # never save a diverged state
                    save(ckpt, step, phase.to_ckpt(state))
                else:
                    _poll_save_errors(ckpt, step)
                if stop:
                    finish_saves(ckpt, step)
                    logger.flush()
                    raise RunInterrupted(step + offset, ckpt.directory, stop)
        finish_saves(ckpt, step)
    finally:
        batches.close()
    # Skipped before a resume come from the rows kept in metrics.jsonl (reporting only:
    # the max_bad_fraction check uses this session's global counts, equal on every process).
    outcome.state, outcome.step = state, step
    outcome.skipped_examples = logger.total('skipped', phase.name, start + offset) + metrics.skipped
    return outcome


@contextlib.contextmanager
def _metrics_end_at_failed_save(ckpt: Checkpointer, logger: MetricsLogger, offset: int):
    """When a save fails, the steps trained while it was being written are not kept:
    their metrics rows go too, so the record ends where the last good save does."""
    try:
        yield
    except CheckpointWriteError:
        logger.drop_after(getattr(ckpt, 'last_save', 0) + offset)
        raise


def _poll_save_errors(ckpt: Checkpointer, step: int) -> None:
    """A save that failed in the background stops the run at the next step."""
    if ckpt.manager.is_saving_in_progress():
        return
    try:
        ckpt.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
        raise _write_error(ckpt, getattr(ckpt, 'last_save', step), e) from e


@contextlib.contextmanager
def closing(ckpt: Checkpointer, logger: MetricsLogger):
    """Closes a run's checkpointer (waiting for its saves) and metrics however it ends."""
    try:
        yield
    finally:
        ckpt.close()
        logger.close()


# ----------------------------------------------------------------------------- evaluation


def pipeline_kwargs(image_size: int, channels: int, model_cfg) -> dict:
    """The input pipeline's per-run arguments (resolution, normalisation, this process)."""
    return dict(image_size=image_size, channels=channels, mean=model_cfg.mean, std=model_cfg.std,
                process_index=jax.process_index(), process_count=jax.process_count())


def state_variants(state: core.TrainState, split: str, eval_step, use_ema: bool) -> list[tuple]:
    """(name, eval step, params, batch stats) for a state and, with EMA, its averages."""
    out = [(split, eval_step, state.params, state.batch_stats)]
    if use_ema:
        out.append((f'{split}_ema', eval_step, state.ema_params, state.ema_batch_stats))
    return out


class Evaluator:
    """Evaluates parameter sets on every example of `config.eval_split` and logs each."""

    def __init__(self, config, logger: MetricsLogger, mesh, pipe_kw: dict):
        import input_pipeline  # noqa: PLC0415 - TensorFlow loads only when data is read

        self.batch = core.eval_batch_size(config.get('eval_batch_size') or config.batch_size)
        self.make_iter, self.num_examples = input_pipeline.create_eval_iterator(
            config.data, dataset=config.dataset, split=config.eval_split,
            global_batch_size=self.batch, **pipe_kw)
        self.sharding = core.batch_sharding(mesh)
        self.logger = logger

    def __call__(self, variants: list[tuple], step: int) -> dict[str, dict]:
        out = {}
        for name, eval_step, params, stats in variants:
            batches = core.prefetch_to_device(self.make_iter(), self.sharding)
            out[name] = core.evaluate(eval_step, params, stats, batches, desc=f'Evaluation ({name})',
                                      num_batches=-(-self.num_examples // self.batch))
            self.logger.write_eval(step, name, out[name])
        return out
