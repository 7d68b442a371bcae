"""Supervised training: `config.trainer = 'supervised'`.

`train_and_evaluate(config, workdir)` trains `config.model` on `config.dataset`, evaluates
on every example of `config.eval_split` (and with the EMA parameters when enabled),
checkpoints with orbax and resumes from the newest checkpoint of `workdir`. The data of
step s is a function of (seed, s), and so is the dropout randomness, so a run that is
stopped and started again ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import input_pipeline
import models
from flaxnets_errors import ConfigError, UserError
from trainers import core, finetune, hyperrule, optim
from trainers.checkpointing import Checkpointer, tree_fingerprint
from trainers.metrics_io import MetricsLogger, write_run_files

# Every top-level key a supervised config may hold (later trainers extend this set).
CONFIG_KEYS = frozenset({
    'trainer', 'model', 'model_kwargs', 'dataset', 'train_split', 'eval_split', 'data',
    'image_size', 'batch_size', 'eval_batch_size', 'num_train_steps', 'seed',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'optimizer', 'learning_rate', 'lr_base_batch_size', 'schedule', 'label_smoothing',
    'ema_decay', 'grad_clip_norm', 'compute_dtype', 'shard_params', 'prefetch_to_device',
    'labeled_per_class', 'compilation_cache_dir',
    # Fine-tuning (trainers/finetune.py) and the BiT-HyperRule (trainers/hyperrule.py).
    'init_from', 'init_from_step', 'init_from_hub', 'finetune', 'hyperrule',
})
FINETUNE_CONFIG_KEYS = frozenset(
    {'init_from', 'init_from_step', 'init_from_hub', 'finetune', 'hyperrule'}
)
REQUIRED_KEYS = ('model', 'dataset', 'batch_size', 'num_train_steps', 'seed',
                 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps')


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the run stopped without saving it."""


def validate_config(config: ml_collections.ConfigDict, known: frozenset = CONFIG_KEYS) -> None:
    """Fails on a missing required key or an unknown (misspelled) one, naming it."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f'The config lacks required key(s) {missing}; add them to the config file.')
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f'{k!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
        raise ConfigError(
            f"Unknown config key(s) {', '.join(hints)} for trainer "
            f"{config.get('trainer', 'supervised')!r}. Known keys: {', '.join(sorted(known))}."
        )


@dataclasses.dataclass
class Setup:
    """What a trainer builds from the config before its loop."""

    model: Any
    model_cfg: Any
    info: Any
    image_size: int
    channels: int
    mesh: Any
    schedule: Any
    tx: Any
    freeze: list  # compiled config.finetune.freeze regexes


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model_kwargs` without its unset (None) fields."""
    return {k: v for k, v in dict(config.get('model_kwargs', {})).items() if v is not None}


def build(config: ml_collections.ConfigDict) -> Setup:
    data_cfg = config.data
    info = input_pipeline.get_dataset_info(config.dataset, data_cfg.data_dir, data_cfg.download)
    model_cfg = models.get_model_cfg(config.model)
    model = models.create_model(
        config.model,
        num_classes=info.num_classes,
        dtype=core.compute_dtype(config),
        **model_overrides(config),
    )
    core.check_batch_size('config.batch_size', config.batch_size)
    core.eval_batch_size(config.get('eval_batch_size') or config.batch_size)
    schedule = optim.create_schedule(config)
    freeze = finetune.compile_patterns(config.get('finetune', {}).get('freeze', ()), 'freeze')
    return Setup(
        model=model,
        model_cfg=model_cfg,
        info=info,
        image_size=config.get('image_size') or model_cfg.input_size[0],
        channels=model_cfg.input_size[2],
        mesh=core.create_mesh(),
        schedule=schedule,
        tx=finetune.freeze_optimizer(optim.create_optimizer(config, schedule), freeze),
        freeze=freeze,
    )


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning('SIGTERM received: saving a checkpoint at the next step, then stopping.')
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def labeled_source(config: ml_collections.ConfigDict):
    """The training examples: the whole `train_split`, or its first `labeled_per_class`
    examples of every class (in the split's fixed order) for low-label experiments."""
    per_class = config.get('labeled_per_class', 0)
    if not per_class:
        return None
    source = input_pipeline.load_source(config.data, config.dataset, config.train_split)
    return source.select(input_pipeline.per_class_indices(source.labels, per_class))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_iterator_fn: Callable[[int, dict], Iterator[dict]] | None = None,
    known_keys: frozenset = CONFIG_KEYS,
) -> dict[str, Any]:
    """Runs (or resumes) one supervised training run; returns the final results.

    Args:
      config: the run config (see configs/default.py).
      workdir: checkpoints, metrics and results go here; resumed from if it has any.
      train_iterator_fn: for trainers built on this loop (Noisy Student's student):
        `(start_step, pipeline_kwargs) -> iterator of this process's batches`, replacing
        the labeled-data iterator. Batches may carry 'targets' and 'weight'.
      known_keys: the config keys the calling trainer accepts.
    """
    validate_config(config, known_keys)
    if config.get('hyperrule'):
        config = hyperrule.resolve(config)
    setup = build(config)
    mesh, model = setup.mesh, setup.model
    total = config.num_train_steps
    pi, pc = jax.process_index(), jax.process_count()
    write_run_files(workdir, config, setup.info.class_names)

    use_ema = bool(config.get('ema_decay', 0.0))
    state, state_sharding = core.create_train_state(
        model,
        setup.tx,
        rng=jax.random.key(config.seed),
        input_shape=(1, setup.image_size, setup.image_size, setup.channels),
        use_ema=use_ema,
        mesh=mesh,
        shard_params=config.get('shard_params', False),
    )
    logging.info(
        'Training %s (%s parameters) on %s: %d devices in %d process(es), global batch %d, '
        '%d steps, compute %s.',
        config.model, f'{sum(x.size for x in jax.tree.leaves(state.params)):,}', config.dataset,
        jax.device_count(), pc, config.batch_size, total, config.get('compute_dtype', 'float32'),
    )
    meta = {
        'model': config.model,
        'model_kwargs': model_overrides(config),
        'param_fingerprint': tree_fingerprint(state.params),
        'dataset': config.dataset,
        'seed': config.seed,
        'batch_size': config.batch_size,
    }
    pretrained = config.get('init_from') or config.get('init_from_hub')
    if pretrained:
        meta['init_from'] = pretrained
    ckpt = Checkpointer(
        os.path.join(workdir, 'checkpoints'), meta, max_to_keep=config.get('keep_checkpoints', 3)
    )
    start_step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(latest)
        state = ckpt.restore(latest, state)
        start_step = int(jax.device_get(state.step))
        logging.info('Resumed from %s at step %d.', ckpt.directory, start_step)
        if pretrained:
            logging.info('Fine-tune resumed from its own checkpoint; %s is not read again.', pretrained)
    elif pretrained:
        state, summary = finetune.initialize_from_pretrained(state, config, setup.info.num_classes)
        if pi == 0:
            with open(os.path.join(workdir, 'init_from.json'), 'w') as f:
                json.dump(summary, f, indent=2)

    train_step = core.jit_train_step(
        core.make_train_step(
            model, setup.tx, setup.schedule, config,
            **finetune.frozen_step_kwargs(state, setup.freeze),
        ),
        state_sharding, mesh,
    )
    eval_step = core.make_eval_step(model, mesh)
    eval_batch = core.eval_batch_size(config.get('eval_batch_size') or config.batch_size)
    pipe_kw = dict(
        image_size=setup.image_size,
        channels=setup.channels,
        mean=setup.model_cfg.mean,
        std=setup.model_cfg.std,
        process_index=pi,
        process_count=pc,
    )
    make_eval_iter, num_eval = input_pipeline.create_eval_iterator(
        config.data, dataset=config.dataset, split=config.eval_split,
        global_batch_size=eval_batch, **pipe_kw,
    )
    sharding = core.batch_sharding(mesh)
    logger = MetricsLogger(workdir, total_steps=total, global_batch_size=config.batch_size)

    def run_eval(step: int) -> dict[str, dict]:
        out = {}
        variants = [(config.eval_split, state.params, state.batch_stats)]
        if use_ema:
            variants.append((f'{config.eval_split}_ema', state.ema_params, state.ema_batch_stats))
        for split, params, stats in variants:
            batches = core.prefetch_to_device(make_eval_iter(), sharding)
            out[split] = core.evaluate(eval_step, params, stats, batches, desc=f'Evaluation ({split})',
                                       num_batches=-(-num_eval // eval_batch))
            logger.write_eval(step, split, out[split])
        return out

    pending: list[tuple[int, dict]] = []

    def flush(step: int) -> dict[str, float] | None:
        """Brings the pending step metrics to the host; stops on a non-finite loss."""
        nonlocal pending
        if not pending:
            return None
        values = jax.device_get([m for _, m in pending])
        for (s, _), v in zip(pending, values, strict=True):
            bad = [k for k in ('loss', 'grad_norm', 'param_norm') if not math.isfinite(float(v[k]))]
            if bad:
                ckpt.wait()
                good = ckpt.latest_step()
                where = (
                    f'the last good checkpoint is step {good} in {ckpt.directory}; running the '
                    f'same command again resumes from it'
                    if good is not None else 'no checkpoint was saved before it'
                )
                raise NonFiniteLossError(
                    f'Non-finite {"/".join(bad)} ({", ".join(f"{k}={float(v[k])}" for k in bad)}) '
                    f'at step {s + 1} (training stopped; nothing was '
                    f'saved after the divergence; {where}). Lower config.learning_rate, set '
                    f'config.grad_clip_norm, lengthen warmup, or use compute_dtype float32.'
                )
        pending = []
        return {k: float(np.mean([v[k] for v in values])) for k in values[0]}

    if train_iterator_fn is not None:
        train_iter = train_iterator_fn(start_step, pipe_kw)
    else:
        train_iter = input_pipeline.create_train_iterator(
            config.data, dataset=config.dataset, split=config.train_split,
            global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
            source=labeled_source(config), **pipe_kw,
        )
    batches = core.prefetch_to_device(
        train_iter, sharding, size=config.get('prefetch_to_device', 2)
    )
    eval_results: dict[str, dict] = {}
    t0 = time.time()
    step = start_step
    try:
        with _Preemption() as preempt:
            logger.mark(step)
            while step < total:
                batch = next(batches)
                state, metrics = train_step(state, batch)
                pending.append((step, metrics))
                step += 1
                if step == start_step + 1:
                    logger.mark(step)  # exclude compilation from throughput
                stop = preempt.requested or (pc > 1 and ckpt.manager.reached_preemption(step))
                if step % config.log_every_steps == 0 or step == total:
                    means = flush(step)
                    if means is not None:
                        logger.write_train(step, means)
                if step % config.eval_every_steps == 0 or step == total:
                    eval_results = run_eval(step)
                if step % config.checkpoint_every_steps == 0 or step == total or stop:
                    flush(step)  # never save a diverged state
                    ckpt.save(step, state, force=True)
                if stop:
                    logging.warning('Stopped for preemption at step %d; checkpoint saved.', step)
                    break
    finally:
        batches.close()
        ckpt.close()
    if step < total:
        logger.close()
        return {'preempted_at_step': step}

    main = eval_results.get(config.eval_split) or run_eval(step)[config.eval_split]
    results = {
        'trainer': config.get('trainer', 'supervised'),
        'model': config.model,
        'dataset': config.dataset,
        'split': config.eval_split,
        'step': step,
        **main,
        'train_time_s': round(time.time() - t0, 2),
    }
    if use_ema:
        results['ema'] = eval_results.get(f'{config.eval_split}_ema')
    logger.write_results(results)
    logger.close()
    logging.info('Final results: %s', json.dumps(results))
    return results
