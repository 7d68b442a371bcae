"""Meta Pseudo Labels (Pham et al. 2021): `config.trainer = 'mpl'`.

"Meta Pseudo Labels", CVPR 2021, Sec. 3 and Appendix; the official TF code is
google-research/meta_pseudo_labels (`training_utils.py`, class `MPL`; flags and the
CIFAR-10-4K command in `flag_utils.py` and `README.md`).

One jitted step updates a teacher T and a student S (two `core.TrainState`s in one pytree,
sharded like the supervised trainer's state, the batch split over the mesh axis 'data',
the state donated):

1. T runs once, in training mode, on [x_l, u_w, u_s] (labeled, unlabeled with the weak
   augmentation, the same unlabeled images with RandAugment). Pseudo-labels y_hat come
   from T(u_s): a sample from its softmax ('hard_sample'), its argmax ('hard_argmax') or
   the softmax itself ('soft'); `config.mpl.pseudo_label`.
2. S runs on [u_s, x_l]; its loss CE(y_hat, S(u_s)) gives one optimizer step S -> S'.
   The labeled loss before (from that same forward) and after (S' on x_l) gives the
   teacher's reward (`config.mpl.reward`):
     'loss_difference'  h = L_l(S) - L_l(S')  (the official code's form);
     'dot_product'      h = eta * grad L_l(S') . grad CE(y_hat, S(u_s)), the first-order
                        form of the paper's Eq. 12 (eta: the student's learning rate).
   Both approximate the change of L_l that learning from y_hat caused; the teacher's
   gradient below is then an unbiased (REINFORCE) estimate of the gradient of
   E_{y_hat ~ T}[L_l(S'(y_hat))] with L_l(S) as baseline (tests/test_mpl.py checks it
   against the exact expectation). Optional moving-average baseline
   (`reward_baseline_decay`, kept in the state) and sign (`reward_sign`).
3. T's loss = h * CE(y_hat, T(u_s))  [gradient through T only; h is a constant]
             + CE(y_l, T(x_l))  [supervised, with label smoothing]
             + uda_weight(t) * UDA  [KL(sg(softmax(T(u_w) / temperature)) || softmax(T(u_s))),
                                    examples whose sharpened max probability is below
                                    `uda.threshold` masked out, averaged over all u;
                                    weight ramped up linearly over `uda.warmup_steps`].
   The teacher's gradient reuses the forward of step 1 (one `jax.vjp`).

With 'soft' pseudo-labels the student's update is a differentiable function of T's
probabilities p_T, so no sampling estimator is needed: the first-order change of L_l is
eta * mean_i sum_k p_T(k|u_i) c_ik with c = (d log softmax S(u) / dS) . grad L_l(S'), one
forward-mode product (`jax.jvp`); the teacher minimises it. This mode needs
`reward = 'dot_product'`.

Then `mpl.finetune_steps` of plain supervised fine-tuning of the student on the labeled
data (core.make_train_step, its own optimizer schedule `mpl.finetune_*`).

Data: `batch_size` labeled + `unlabeled_ratio * batch_size` unlabeled images per step.
The labeled stream uses seed `seed`; both unlabeled views come from two pipelines over
the same pool with seed `seed + 1` (so the same images in the same rows: the order is a
function of (seed, step) only), one with `config.data` minus RandAugment (weak: crop /
flip) and one with `config.data` (strong). The labeled images get the weak view. The
unlabeled pool is `train_split` minus the labeled subset (`labeled_per_class`).

Where this departs from the paper, following the official code: the reward is the loss
difference, not Eq. 12's dot product; the teacher also gets the supervised and UDA losses
(the paper's Appendix A.3 describes this "UDA + MPL" teacher too); the student learns only
from pseudo-labels until the fine-tuning phase; the student's learning rate is 0 for the
first `mpl.student_wait_steps` steps. Where it departs from the official code: the
official reward is L_l(S') - L_l(S) with a moving-average baseline of decay 0.99, and the
released step trains the student on the teacher's *soft* targets and forms the MPL term
as a cross-entropy of T(u_s) against its own stopped softmax (whose gradient is zero);
here the sign gives h > 0 when the student improved (`reward_sign = +1`), the baseline is
optional (`reward_baseline_decay`), and hard pseudo-labels are the default, as in the
paper's Sec. 3. The official code computes the student's "before" loss on a forward over
[u_s, x_l] (BatchNorm statistics of that mix) and the "after" loss on x_l alone; we do
the same, and a baseline absorbs the constant offset that creates.

Outputs: checkpoints (both states, the reward baseline, the step) in
`<workdir>/checkpoints`, fine-tuning checkpoints in `<workdir>/finetune_checkpoints`,
`metrics.jsonl` (train records with teacher and student losses, reward, UDA mask ratio;
eval records for the student (`test`), its EMA (`test_ema`), the teacher
(`test_teacher`) and the fine-tuned student (`test_finetuned`, steps counted after the
MPL steps)) and `results.json`: `top1` (the final student: the fine-tuned one when
`finetune_steps > 0`), `student_top1` (before fine-tuning), `teacher_top1`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import input_pipeline
import models
from flaxnets_errors import ConfigError
from trainers import configuration, core, loop, mpl_step, optim
from trainers.checkpointing import Checkpointer, tree_fingerprint
from trainers.metrics_io import MetricsLogger
from trainers.mpl_step import (  # noqa: F401 - the step and its parts, under this trainer's name
    MPLState,
    apply_reward_baseline,
    dot_product_reward,
    loss_difference_reward,
    make_mpl_step,
    mpl_teacher_loss,
    pseudo_label_targets,
    soft_mpl_teacher_loss,
    uda_loss,
    uda_weight,
)
from trainers.progress import LogCompilation
from trainers.workdir import RunOptions, open_run

# Fine-tuning from pretrained weights is a supervised-trainer mode only.
CONFIG_KEYS = (configuration.SUPERVISED_KEYS - configuration.FINETUNE_KEYS) | frozenset({
    'teacher_model', 'teacher_model_kwargs', 'teacher_optimizer', 'teacher_learning_rate',
    'teacher_schedule', 'unlabeled_ratio', 'mpl', 'uda',
})
MPL_KEYS = frozenset({
    'pseudo_label', 'reward', 'reward_baseline_decay', 'reward_sign', 'student_wait_steps',
    'finetune_steps', 'finetune_learning_rate', 'finetune_schedule',
})
UDA_KEYS = frozenset({'weight', 'threshold', 'temperature', 'warmup_steps'})
PSEUDO_LABELS = mpl_step.PSEUDO_LABELS
REWARDS = ('loss_difference', 'dot_product')


# ----------------------------------------------------------------------------- configs


def _validate(config: ml_collections.ConfigDict) -> None:
    configuration.validate_config(config, CONFIG_KEYS)
    configuration.check_sections(config, {'mpl': MPL_KEYS, 'uda': UDA_KEYS}, 'MPL')
    if config.mpl.pseudo_label not in PSEUDO_LABELS:
        raise ConfigError(f'config.mpl.pseudo_label={config.mpl.pseudo_label!r}; use one of {PSEUDO_LABELS}.')
    if config.mpl.reward not in REWARDS:
        raise ConfigError(f'config.mpl.reward={config.mpl.reward!r}; use one of {REWARDS}.')
    if config.mpl.pseudo_label == 'soft' and config.mpl.reward != 'dot_product':
        raise ConfigError("config.mpl.pseudo_label='soft' needs config.mpl.reward='dot_product'.")
    if config.data.get('mixup_alpha', 0.0) or config.data.get('cutmix_alpha', 0.0):
        raise ConfigError('MPL does not use mixup / CutMix: set config.data.mixup_alpha and cutmix_alpha to 0.')
    n = jax.device_count()
    b_u = unlabeled_batch_size(config)
    for key, b in (('batch_size', config.batch_size), ('unlabeled_ratio * batch_size', b_u)):
        core.check_batch_size(key, b, n)


def unlabeled_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(round(config.unlabeled_ratio * config.batch_size))


def _derived(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A supervised-style config (for trainers/optim.py) with `changes` set."""
    return configuration.derived(config, CONFIG_KEYS - configuration.SUPERVISED_KEYS, **changes)


def student_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The student's LR: 0 for `mpl.student_wait_steps` steps, then `config.schedule`
    (warmup and decay) over the remaining steps, as the official `num_wait_steps`."""
    wait = int(config.mpl.student_wait_steps)
    base = optim.create_schedule(_derived(config, num_train_steps=max(1, config.num_train_steps - wait)))
    if not wait:
        return base
    return lambda step: jnp.where(step < wait, 0.0, base(jnp.maximum(step - wait, 0)))


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return _derived(
        config,
        optimizer=ml_collections.ConfigDict(config.teacher_optimizer.to_dict()),
        learning_rate=config.teacher_learning_rate,
        schedule=ml_collections.ConfigDict(config.teacher_schedule.to_dict()),
    )


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return _derived(
        config,
        learning_rate=config.mpl.finetune_learning_rate,
        schedule=ml_collections.ConfigDict(config.mpl.finetune_schedule.to_dict()),
        num_train_steps=config.mpl.finetune_steps,
    )


def _weak(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    weak = ml_collections.ConfigDict(data_config.to_dict())
    weak.randaugment_layers = 0
    weak.autoaugment = ''
    return weak


# ----------------------------------------------------------------------------- data


def data_sources(config: ml_collections.ConfigDict):
    """(labeled source or None for the whole split, unlabeled pool source)."""
    pool = input_pipeline.load_source(config.data, config.dataset, config.train_split)
    per_class = config.get('labeled_per_class', 0)
    if not per_class:
        logging.warning('labeled_per_class is 0: the unlabeled pool is the whole labeled split.')
        return None, pool
    labeled_idx = input_pipeline.per_class_indices(pool.labels, per_class)
    unlabeled_idx = np.setdiff1d(np.arange(len(pool)), labeled_idx)
    return pool.select(labeled_idx), pool.select(unlabeled_idx)


def train_batches(config, labeled, unlabeled, start_step: int, pipe_kw: dict) -> Iterator[dict]:
    """This process's MPL batches from `start_step` on: labeled (seed), weak and strong
    unlabeled views (seed + 1, same order, so row i is the same image in both)."""
    b_u = unlabeled_batch_size(config)
    common = dict(dataset=config.dataset, split=config.train_split, start_step=start_step, **pipe_kw)
    weak = _weak(config.data)
    lab = input_pipeline.create_train_iterator(
        weak, global_batch_size=config.batch_size, seed=config.seed, source=labeled, **common)
    u_weak = input_pipeline.create_train_iterator(
        weak, global_batch_size=b_u, seed=config.seed + 1, source=unlabeled, **common)
    u_strong = input_pipeline.create_train_iterator(
        config.data, global_batch_size=b_u, seed=config.seed + 1, source=unlabeled, **common)
    for l_b, w_b, s_b in zip(lab, u_weak, u_strong, strict=True):
        batch = {'image': l_b['image'], 'label': l_b['label'], 'image_uw': w_b['image'],
                 'image_us': s_b['image']}
        if 'valid' in l_b:  # undecodable images' stand-ins count for nothing
            batch['valid'], batch['valid_u'] = l_b['valid'], w_b['valid'] * s_b['valid']
        yield batch


# ----------------------------------------------------------------------------- checkpoints


def _to_ckpt(state: MPLState) -> dict:
    """A flat dict (Checkpointer drops empty top-level subtrees, e.g. no batch_stats)."""
    out = {'reward_baseline': state.reward_baseline}
    for role in ('teacher', 'student'):
        ts = getattr(state, role)
        for f in ts.__dataclass_fields__:
            out[f'{role}_{f}'] = getattr(ts, f)
    return out


def _from_ckpt(d: dict) -> MPLState:
    parts = {}
    for role in ('teacher', 'student'):
        parts[role] = core.TrainState(**{f: d[f'{role}_{f}'] for f in core.TrainState.__dataclass_fields__})
    return MPLState(reward_baseline=d['reward_baseline'], **parts)


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       options: RunOptions | None = None) -> dict[str, Any]:
    """Runs (or resumes) MPL training and the student's fine-tuning; returns the results.

    Raises:
      loop.RunInterrupted: after saving, when a signal or preemption stopped the run.
    """
    _validate(config)
    info = input_pipeline.get_dataset_info(config.dataset, config.data.data_dir, config.data.download)
    configuration.check_data(config, [(config.dataset, config.train_split), (config.dataset, config.eval_split)])
    s_cfg = models.get_model_cfg(config.model)
    if s_cfg.input_size[2] != models.get_model_cfg(config.teacher_model).input_size[2]:
        raise ConfigError(f'Teacher {config.teacher_model} and student {config.model} take different '
                          f'numbers of channels; they must read the same images.')
    with open_run(workdir, config, info.class_names, options):
        return _train(config, workdir, info, s_cfg)


def _initial_state(config, teacher_model, student_model, t_tx, s_tx, input_shape, mesh):
    """The MPLState's `core.StateSpec` (teacher and student from fold_in(seed, 0/1))."""
    rng = jax.random.key(config.seed)
    shard = config.get('shard_params', False)
    teacher = core.train_state_spec(
        teacher_model, t_tx, rng=jax.random.fold_in(rng, 0), input_shape=input_shape,
        use_ema=False, mesh=mesh, shard_params=shard)
    student = core.train_state_spec(
        student_model, s_tx, rng=jax.random.fold_in(rng, 1), input_shape=input_shape,
        use_ema=bool(config.get('ema_decay', 0.0)), mesh=mesh, shard_params=shard)
    replicated = core.replicated(mesh)
    sharding = MPLState(teacher=teacher.shardings, student=student.shardings,
                        reward_baseline=replicated)
    abstract = MPLState(teacher=teacher.abstract, student=student.abstract,
                        reward_baseline=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))

    def init() -> MPLState:
        state = MPLState(teacher=teacher.init(), student=student.init(),
                         reward_baseline=jnp.zeros((), jnp.float32))
        return jax.device_put(state, sharding)

    return core.StateSpec(abstract=abstract, shardings=sharding, init=init)


def _train(config, workdir: str, info, s_cfg) -> dict[str, Any]:
    dtype, total, split = core.compute_dtype(config), config.num_train_steps, config.eval_split
    image_size, channels = config.get('image_size') or s_cfg.input_size[0], s_cfg.input_size[2]
    remat = config.get('remat', 'none')
    student_model = models.create_model(config.model, num_classes=info.num_classes, dtype=dtype,
                                        remat=remat, **configuration.model_overrides(config))
    teacher_model = models.create_model(config.teacher_model, num_classes=info.num_classes, dtype=dtype,
                                        remat=remat, **configuration.model_overrides(config, 'teacher_model_kwargs'))
    mesh = core.create_mesh()
    sharding = core.batch_sharding(mesh)
    s_schedule = student_schedule(config)
    s_tx = optim.create_optimizer(config, s_schedule)
    t_conf = teacher_config(config)
    t_schedule = optim.create_schedule(t_conf)
    t_tx = optim.create_optimizer(t_conf, t_schedule)
    use_ema = bool(config.get('ema_decay', 0.0))
    spec = _initial_state(config, teacher_model, student_model, t_tx, s_tx,
                          (1, image_size, image_size, channels), mesh)
    state, state_sharding, init = spec.abstract, spec.shardings, spec.init
    meta = {'model': f'mpl:{config.teacher_model}->{config.model}',
            'param_fingerprint': tree_fingerprint({'t': state.teacher.params, 's': state.student.params}),
            'dataset': config.dataset, 'seed': config.seed, 'batch_size': config.batch_size}
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), meta,
                        max_to_keep=config.get('keep_checkpoints', 3))
    pipe_kw = loop.pipeline_kwargs(image_size, channels, s_cfg)
    batch_per_step = config.batch_size + unlabeled_batch_size(config)
    logger = MetricsLogger(workdir, total_steps=total + config.mpl.finetune_steps,
                           global_batch_size=batch_per_step)
    evaluator = loop.Evaluator(config, logger, mesh, pipe_kw)
    s_eval, t_eval = core.make_eval_step(student_model, mesh), core.make_eval_step(teacher_model, mesh)

    def mpl_eval(st: MPLState, step: int) -> dict:
        teacher = [(f'{split}_teacher', t_eval, st.teacher.params, st.teacher.batch_stats)]
        return evaluator(loop.state_variants(st.student, split, s_eval, use_ema) + teacher, step)

    labeled, unlabeled = data_sources(config)
    step_fn = LogCompilation(core.mesh_jit(
        make_mpl_step(teacher_model, student_model, t_tx, s_tx, t_schedule, s_schedule, config), mesh,
        in_shardings=(state_sharding, sharding), out_shardings=(state_sharding, core.replicated(mesh)),
        donate_argnums=(0,),
    ), 'MPL teacher-student step')
    phase = loop.Phase(
        name='train', state=state, step_fn=step_fn, evaluate=mpl_eval, checkpointer=ckpt,
        batches=lambda start: train_batches(config, labeled, unlabeled, start, pipe_kw),
        total_steps=total, sharding=sharding, to_ckpt=_to_ckpt, from_ckpt=_from_ckpt,
        prefetch=config.get('prefetch_to_device', 2), global_batch_size=batch_per_step,
        max_bad_fraction=config.data.get('max_bad_fraction', 1e-3), init=init,
    )
    t0 = time.time()
    with loop.closing(ckpt, logger):
        outcome = loop.run(phase, config, logger)
        mpl_results = outcome.eval_results or mpl_eval(outcome.state, total)
        results = {
            'trainer': 'mpl', 'model': config.model, 'teacher_model': config.teacher_model,
            'dataset': config.dataset, 'split': split, 'step': total, **mpl_results[split],
            'student_top1': mpl_results[split]['top1'],
            'teacher_top1': mpl_results[f'{split}_teacher']['top1'],
            'skipped_examples': outcome.skipped_examples,
        }
        if use_ema:
            results['ema'] = mpl_results[f'{split}_ema']
        if config.mpl.finetune_steps:
            ft, skipped = _finetune(config, outcome.state.student, student_model,
                                    state_sharding.student, mesh, labeled, pipe_kw, logger,
                                    workdir, evaluator, s_eval, use_ema)
            results.update({**ft[split], 'finetuned_top1': ft[split]['top1'],
                            'finetune_steps': config.mpl.finetune_steps})
            results['skipped_examples'] += skipped
            if use_ema:
                results['finetuned_ema'] = ft[f'{split}_ema']
        results['train_time_s'] = round(time.time() - t0, 2)
        logger.write_results(results)
        return results


def _finetune(config, student: core.TrainState, model, shardings, mesh, labeled, pipe_kw, logger,
              workdir, evaluator, eval_step, use_ema) -> tuple[dict, int]:
    """Plain supervised training of the student's parameters on the labeled data;
    returns (evaluation results, skipped examples)."""
    ft_conf = finetune_config(config)
    schedule = optim.create_schedule(ft_conf)
    tx = optim.create_optimizer(ft_conf, schedule)
    opt_shardings = core.state_shardings(mesh, jax.eval_shape(tx.init, student.params),
                                         config.get('shard_params', False))
    shardings = shardings.replace(opt_state=opt_shardings)
    state = jax.jit(
        lambda s: s.replace(
            step=jnp.zeros((), jnp.int32), opt_state=tx.init(s.params),
            ema_params=jax.tree.map(jnp.copy, s.params) if use_ema else {},
            ema_batch_stats=jax.tree.map(jnp.copy, s.batch_stats) if use_ema else {}),
        out_shardings=shardings,
    )(student)
    meta = {'model': config.model, 'param_fingerprint': tree_fingerprint(state.params),
            'dataset': config.dataset, 'seed': config.seed, 'batch_size': config.batch_size}
    ckpt = Checkpointer(os.path.join(workdir, 'finetune_checkpoints'), meta,
                        max_to_keep=config.get('keep_checkpoints', 3))
    split, offset = config.eval_split, config.num_train_steps

    def evaluate(st, step):
        variants = [(f'{name}_finetuned', *rest)  # test_finetuned, test_ema_finetuned
                    for name, *rest in loop.state_variants(st, split, eval_step, use_ema)]
        return {k.removesuffix('_finetuned'): v for k, v in evaluator(variants, step).items()}

    def batches(start: int):
        return input_pipeline.create_train_iterator(
            _weak(config.data), dataset=config.dataset, split=config.train_split,
            global_batch_size=config.batch_size, seed=config.seed + 2, start_step=start,
            source=labeled, **pipe_kw)

    phase = loop.Phase(
        name='finetune', state=state, evaluate=evaluate, batches=batches, checkpointer=ckpt,
        step_fn=core.jit_train_step(core.make_train_step(model, tx, schedule, ft_conf), shardings, mesh),
        total_steps=config.mpl.finetune_steps, sharding=core.batch_sharding(mesh), step_offset=offset,
        prefetch=config.get('prefetch_to_device', 2), global_batch_size=config.batch_size,
        max_bad_fraction=config.data.get('max_bad_fraction', 1e-3),
    )
    try:
        outcome = loop.run(phase, config, logger)
    finally:
        ckpt.close()
    return outcome.eval_results or evaluate(outcome.state, offset + phase.total_steps), outcome.skipped_examples
