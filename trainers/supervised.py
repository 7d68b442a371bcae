"""Supervised training: `config.trainer = 'supervised'`.

`train_and_evaluate(config, workdir)` trains `config.model` on `config.dataset`, evaluates
on every example of `config.eval_split` (and with the EMA parameters when enabled),
checkpoints with orbax and resumes from the newest checkpoint of `workdir`. The data of
step s is a function of (seed, s), and so is the dropout randomness, so a run that is
stopped and started again ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

import input_pipeline
import models
from trainers import configuration, core, finetune, hyperrule, loop, optim
from trainers.checkpointing import Checkpointer, tree_fingerprint
from trainers.metrics_io import MetricsLogger
from trainers.workdir import RunOptions, open_run

CONFIG_KEYS = configuration.SUPERVISED_KEYS
# The supervised trainer's config helpers, under the names scripts and tests use.
validate_config = configuration.validate_config
model_overrides = configuration.model_overrides


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


def build(config: ml_collections.ConfigDict) -> Setup:
    data_cfg = config.data
    info = input_pipeline.get_dataset_info(config.dataset, data_cfg.data_dir, data_cfg.download)
    model_cfg = models.get_model_cfg(config.model)
    model = models.create_model(
        config.model,
        num_classes=info.num_classes,
        dtype=core.compute_dtype(config),
        remat=config.get('remat', 'none'),
        **configuration.model_overrides(config),
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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_iterator_fn: Callable[[int, dict], Iterator[dict]] | None = None,
    known_keys: frozenset = CONFIG_KEYS,
    options: RunOptions | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one supervised training run; returns the final results.

    Args:
      config: the run config (see configs/default.py).
      workdir: checkpoints, metrics and results go here; resumed from if it has any.
      train_iterator_fn: for trainers built on this one (Noisy Student's student):
        `(start_step, pipeline_kwargs) -> iterator of this process's batches`, replacing
        the labeled-data iterator. Batches may carry 'targets' and 'weight'.
      known_keys: the config keys the calling trainer accepts.
      options: command-line choices (`train.py --allow_config_change`).

    Raises:
      loop.RunInterrupted: after saving, when a signal or preemption stopped the run.
    """
    configuration.validate_config(config, known_keys)
    if config.get('hyperrule'):
        config = hyperrule.resolve(config)
    setup = build(config)
    if train_iterator_fn is None:  # Noisy Student checks its own data once
        configuration.check_data(config, [(config.dataset, config.train_split),
                                          (config.dataset, config.eval_split)])
    with open_run(workdir, config, setup.info.class_names, options):
        return _train(config, workdir, setup, train_iterator_fn)


def _train(config, workdir: str, setup: Setup, train_iterator_fn) -> dict[str, Any]:
    mesh, model, total = setup.mesh, setup.model, config.num_train_steps
    use_ema = bool(config.get('ema_decay', 0.0))
    spec = core.train_state_spec(
        model, setup.tx, rng=jax.random.key(config.seed),
        input_shape=(1, setup.image_size, setup.image_size, setup.channels),
        use_ema=use_ema, mesh=mesh, shard_params=config.get('shard_params', False),
    )
    # Abstract until the loop knows whether a checkpoint restores (a resume never
    # compiles the init program); a fine-tune's first start needs the values now.
    state, state_sharding, init = spec.abstract, spec.shardings, spec.init
    logging.info(
        'Training %s (%s parameters) on %s: %d devices in %d process(es), global batch %d, '
        '%d steps, compute %s.',
        config.model, f'{sum(x.size for x in jax.tree.leaves(state.params)):,}', config.dataset,
        jax.device_count(), jax.process_count(), config.batch_size, total,
        config.get('compute_dtype', 'float32'),
    )
    meta = {'model': config.model, 'model_kwargs': configuration.model_overrides(config),
            'param_fingerprint': tree_fingerprint(state.params), 'dataset': config.dataset,
            'seed': config.seed, 'batch_size': config.batch_size}
    pretrained = config.get('init_from') or config.get('init_from_hub')
    if pretrained:
        meta['init_from'] = pretrained
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), meta,
                        max_to_keep=config.get('keep_checkpoints', 3))
    if pretrained and ckpt.latest_step() is None:
        state, init = init(), None
        state, summary = finetune.initialize_from_pretrained(state, config, setup.info.num_classes)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, 'init_from.json'), 'w') as f:
                json.dump(summary, f, indent=2)
    elif pretrained:
        logging.info('Fine-tune resumes from its own checkpoint; %s is not read again.', pretrained)

    train_step = core.jit_train_step(
        core.make_train_step(model, setup.tx, setup.schedule, config,
                             **finetune.frozen_step_kwargs(state, setup.freeze)),
        state_sharding, mesh,
    )
    eval_step = core.make_eval_step(model, mesh)
    pipe_kw = loop.pipeline_kwargs(setup.image_size, setup.channels, setup.model_cfg)
    logger = MetricsLogger(workdir, total_steps=total, global_batch_size=config.batch_size)
    evaluator = loop.Evaluator(config, logger, mesh, pipe_kw)

    def batches(start_step: int) -> Iterator[dict]:
        if train_iterator_fn is not None:
            return train_iterator_fn(start_step, pipe_kw)
        return input_pipeline.create_train_iterator(
            config.data, dataset=config.dataset, split=config.train_split,
            global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
            source=configuration.labeled_source(config), **pipe_kw,
        )

    def evaluate(st, step: int) -> dict[str, dict]:
        return evaluator(loop.state_variants(st, config.eval_split, eval_step, use_ema), step)

    phase = loop.Phase(
        name='train', state=state, step_fn=train_step, batches=batches, evaluate=evaluate,
        checkpointer=ckpt, total_steps=total, sharding=core.batch_sharding(mesh),
        prefetch=config.get('prefetch_to_device', 2), global_batch_size=config.batch_size,
        max_bad_fraction=config.data.get('max_bad_fraction', 1e-3), init=init,
    )
    t0 = time.time()
    with loop.closing(ckpt, logger):
        outcome = loop.run(phase, config, logger)
        final = outcome.eval_results or evaluate(outcome.state, outcome.step)
        results = {
            'trainer': config.get('trainer', 'supervised'), 'model': config.model,
            'dataset': config.dataset, 'split': config.eval_split, 'step': outcome.step,
            **final[config.eval_split],
            'skipped_examples': outcome.skipped_examples,
            'train_time_s': round(time.time() - t0, 2),
        }
        if use_ema:
            results['ema'] = final.get(f'{config.eval_split}_ema')
        logger.write_results(results)
        return results
