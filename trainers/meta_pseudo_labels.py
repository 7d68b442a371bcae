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

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import input_pipeline
import models
from flaxnets_errors import ConfigError
from trainers import configuration, core, loop, optim
from trainers.checkpointing import Checkpointer, tree_fingerprint
from trainers.metrics_io import MetricsLogger
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
PSEUDO_LABELS = ('hard_sample', 'hard_argmax', 'soft')
REWARDS = ('loss_difference', 'dot_product')


class MPLState(flax.struct.PyTreeNode):
    """Teacher and student states and the reward baseline; `student.step` is the step."""

    teacher: core.TrainState
    student: core.TrainState
    reward_baseline: jax.Array


# ----------------------------------------------------------------------------- pure parts


def loss_difference_reward(loss_before: jax.Array, loss_after: jax.Array) -> jax.Array:
    """h = L_l(S) - L_l(S'): positive when learning from the pseudo-labels helped."""
    return loss_before - loss_after


def dot_product_reward(grad_labeled_after: Any, grad_unlabeled: Any, eta) -> jax.Array:
    """h = eta * grad_S L_l(S') . grad_S CE(y_hat, S(u)) (paper, Eq. 12, first order).

    For the SGD step S' = S - eta * grad CE(y_hat, S(u)), L_l(S) - L_l(S') equals this
    up to O(eta^2) (Taylor expansion of L_l around S').
    """
    dots = jax.tree.map(lambda a, b: jnp.vdot(a, b), grad_labeled_after, grad_unlabeled)
    return eta * sum(jax.tree.leaves(dots))


def apply_reward_baseline(reward: jax.Array, baseline: jax.Array, decay: float):
    """Returns (reward - new baseline, new baseline), the baseline an exponential moving
    average of the reward (official code: decay 0.99, updated before it is subtracted).
    decay 0 turns it off (the reward is returned unchanged, the baseline stays 0)."""
    if not decay:
        return reward, baseline
    new = decay * baseline + (1.0 - decay) * reward
    return reward - new, new


def mpl_teacher_loss(teacher_logits_u: jax.Array, pseudo_labels: jax.Array, reward) -> jax.Array:
    """The teacher's MPL term h * mean_i CE(y_hat_i, T(u_i)).

    Args:
      teacher_logits_u: (n, K) teacher logits on the (strongly augmented) unlabeled images.
      pseudo_labels: (n, K) one-hot pseudo-labels (constants).
      reward: scalar h; no gradient flows through it.

    Its gradient, -h * grad_T log p_T(y_hat | u), is the REINFORCE estimate of the
    gradient of E_{y_hat ~ p_T}[L_l(S'(y_hat))] when h = L_l(S) - L_l(S').
    """
    ce = optax.softmax_cross_entropy(teacher_logits_u, jax.lax.stop_gradient(pseudo_labels))
    return jax.lax.stop_gradient(reward) * ce.mean()


def soft_mpl_teacher_loss(teacher_probs_u: jax.Array, coefficients: jax.Array, eta) -> jax.Array:
    """First-order change of L_l for soft pseudo-labels: eta * mean_i sum_k p_ik c_ik.

    Args:
      teacher_probs_u: (n, K) the student's soft targets as a function of T.
      coefficients: (n, K) c_ik = grad_S log softmax(S(u_i))_k . grad_S L_l(S') (constants).
      eta: the student's learning rate.
    """
    c = jax.lax.stop_gradient(coefficients)
    return eta * jnp.mean(jnp.sum(teacher_probs_u * c, axis=-1))


def uda_loss(logits_weak: jax.Array, logits_strong: jax.Array, threshold: float, temperature: float):
    """UDA consistency (Xie et al. 2020) as the MPL code uses it.

    Targets p = stop_gradient(softmax(logits_weak / temperature)); examples with
    max(p) < threshold are masked out; loss = sum_i mask_i KL(p_i || softmax(logits_strong_i))
    / n (the mean over *all* n unlabeled examples, as the official code divides by the
    unlabeled batch size). Returns (loss, fraction of examples kept).
    """
    p = jax.lax.stop_gradient(jax.nn.softmax(logits_weak.astype(jnp.float32) / temperature))
    mask = (jnp.max(p, axis=-1) >= threshold).astype(jnp.float32)
    log_q = jax.nn.log_softmax(logits_strong.astype(jnp.float32))
    kl = jnp.sum(p * (jnp.log(jnp.clip(p, 1e-30)) - log_q), axis=-1)
    return jnp.sum(kl * mask) / logits_weak.shape[0], mask.mean()


def uda_weight(step, weight: float, warmup_steps: int):
    """weight * min(1, step / warmup_steps) (official: `uda_steps`)."""
    if not warmup_steps:
        return jnp.asarray(weight, jnp.float32)
    return weight * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def pseudo_label_targets(kind: str, teacher_logits_u: jax.Array, rng: jax.Array) -> jax.Array:
    """(n, K) student targets from the teacher's logits (treated as constants)."""
    logits = jax.lax.stop_gradient(teacher_logits_u.astype(jnp.float32))
    num_classes = logits.shape[-1]
    if kind == 'hard_sample':
        return jax.nn.one_hot(jax.random.categorical(rng, logits), num_classes)
    if kind == 'hard_argmax':
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes)
    if kind == 'soft':
        return jax.nn.softmax(logits)
    raise ConfigError(f'config.mpl.pseudo_label={kind!r}; use one of {PSEUDO_LABELS}.')


def _smooth(targets: jax.Array, label_smoothing: float) -> jax.Array:
    if not label_smoothing:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


# ----------------------------------------------------------------------------- the step


def _apply(model, params, batch_stats, images, rng):
    """Training-mode forward; returns (float32 logits, updated batch stats)."""
    has_bn = bool(batch_stats)
    out, mutated = model.apply(
        core.model_variables(core.gathered(params), batch_stats), images, train=True,
        mutable=['batch_stats'] if has_bn else [], rngs={'dropout': rng},
    )
    return out.astype(jnp.float32), (mutated['batch_stats'] if has_bn else batch_stats)


def _ema(decay: float, old: Any, new: Any) -> Any:
    return jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, old, new)


def make_mpl_step(
    teacher_model, student_model, teacher_tx, student_tx, teacher_schedule, student_schedule,
    config: ml_collections.ConfigDict,
) -> Callable[[MPLState, dict], tuple[MPLState, dict]]:
    """The pure MPL step: (state, batch) -> (state, metrics). Not yet jitted.

    The batch holds 'image' / 'label' (labeled) and 'image_uw' / 'image_us' (the weak
    and strong views of the same unlabeled images). Randomness (dropout, sampled
    pseudo-labels) comes from fold_in(seed, step), so a resumed run repeats it.
    """
    base_rng = jax.random.key(config.seed)
    mpl, uda = config.mpl, config.uda
    label_smoothing = config.get('label_smoothing', 0.0)
    ema_decay = config.get('ema_decay', 0.0)
    soft = mpl.pseudo_label == 'soft'
    use_dot = mpl.reward == 'dot_product'

    def step_fn(state: MPLState, batch: dict) -> tuple[MPLState, dict]:
        step = state.student.step
        rng = jax.random.fold_in(base_rng, step)
        t_rng, s_rng, s2_rng, sample_rng = jax.random.split(rng, 4)
        x_l, y_l = batch['image'], batch['label']
        u_w, u_s = batch['image_uw'], batch['image_us']
        n_l, n_u = x_l.shape[0], u_w.shape[0]
        t, s = state.teacher, state.student

        # 1. The teacher, once, on everything; its gradient comes back through t_vjp.
        t_logits, t_vjp, t_stats = jax.vjp(
            lambda p: _apply(teacher_model, p, t.batch_stats, jnp.concatenate([x_l, u_w, u_s]), t_rng),
            t.params, has_aux=True,
        )
        targets = pseudo_label_targets(mpl.pseudo_label, t_logits[n_l + n_u:], sample_rng)

        # 2. The student's step on the pseudo-labels, and its labeled loss before / after.
        def student_fwd(params):
            return _apply(student_model, params, s.batch_stats, jnp.concatenate([u_s, x_l]), s_rng)

        def student_loss(params):
            logits, stats = student_fwd(params)
            loss_u = optax.softmax_cross_entropy(logits[:n_u], _smooth(targets, label_smoothing)).mean()
            loss_l = core.cross_entropy(logits[n_u:], y_l).mean()
            return loss_u, (loss_l, stats)

        (s_loss_u, (l_before, s_stats)), g_u = jax.value_and_grad(student_loss, has_aux=True)(s.params)
        s_updates, s_opt_state = student_tx.update(g_u, s.opt_state, s.params)
        s_params = optax.apply_updates(s.params, s_updates)
        eta = student_schedule(step)

        def labeled_after(params):
            logits, _ = _apply(student_model, params, s_stats, x_l, s2_rng)
            return core.cross_entropy(logits, y_l).mean()

        if use_dot:
            l_after, g_l = jax.value_and_grad(labeled_after)(s_params)
            reward = dot_product_reward(g_l, g_u, eta)
        else:
            l_after = labeled_after(s_params)
            reward = loss_difference_reward(l_before, l_after)
        reward = mpl.reward_sign * reward
        advantage, baseline = apply_reward_baseline(
            reward, state.reward_baseline, mpl.reward_baseline_decay
        )
        if soft:
            _, dlogq = jax.jvp(
                lambda p: jax.nn.log_softmax(student_fwd(p)[0][:n_u]), (s.params,), (g_l,)
            )

        # 3. The teacher's loss, as a function of its logits.
        w_uda = uda_weight(step, uda.weight, uda.warmup_steps)

        def teacher_loss(logits):
            lg_l, lg_w, lg_s = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
            sup = core.cross_entropy(lg_l, y_l, label_smoothing).mean()
            cons, kept = uda_loss(lg_w, lg_s, uda.threshold, uda.temperature)
            if soft:
                probs = _smooth(jax.nn.softmax(lg_s), label_smoothing)
                mpl_term = mpl.reward_sign * soft_mpl_teacher_loss(probs, dlogq, eta)
            else:
                mpl_term = mpl_teacher_loss(lg_s, targets, advantage)
            return sup + w_uda * cons + mpl_term, (sup, cons, kept, mpl_term)

        (t_loss, (t_sup, t_uda, kept, t_mpl)), g_logits = jax.value_and_grad(
            teacher_loss, has_aux=True)(t_logits)
        (g_t,) = t_vjp(g_logits)
        t_updates, t_opt_state = teacher_tx.update(g_t, t.opt_state, t.params)
        t_params = optax.apply_updates(t.params, t_updates)

        teacher = t.replace(step=t.step + 1, params=t_params, batch_stats=t_stats, opt_state=t_opt_state)
        student = s.replace(step=s.step + 1, params=s_params, batch_stats=s_stats, opt_state=s_opt_state)
        if ema_decay:
            student = student.replace(
                ema_params=_ema(ema_decay, s.ema_params, s_params),
                ema_batch_stats=_ema(ema_decay, s.ema_batch_stats, s_stats),
            )
        metrics = {
            'loss': t_loss,
            'teacher_loss_labeled': t_sup,
            'teacher_loss_uda': t_uda,
            'teacher_loss_mpl': t_mpl,
            'uda_mask_ratio': kept,
            'uda_weight': w_uda,
            'student_loss_unlabeled': s_loss_u,
            'student_loss_labeled_before': l_before,
            'student_loss_labeled_after': l_after,
            'reward': reward,
            'reward_baseline': baseline,
            'teacher_top1': core.topk_correct(t_logits[:n_l], y_l, 1).mean(),
            'grad_norm': optax.global_norm(g_t),
            'student_grad_norm': optax.global_norm(g_u),
            'param_norm': optax.global_norm(s_params),
            'lr': eta,
            'teacher_lr': teacher_schedule(step),
        }
        return MPLState(teacher=teacher, student=student, reward_baseline=baseline), metrics

    return step_fn


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
        yield {'image': l_b['image'], 'label': l_b['label'], 'image_uw': w_b['image'],
               'image_us': s_b['image']}


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
    s_cfg = models.get_model_cfg(config.model)
    if s_cfg.input_size[2] != models.get_model_cfg(config.teacher_model).input_size[2]:
        raise ConfigError(f'Teacher {config.teacher_model} and student {config.model} take different '
                          f'numbers of channels; they must read the same images.')
    with open_run(workdir, config, info.class_names, options):
        return _train(config, workdir, info, s_cfg)


def _initial_state(config, teacher_model, student_model, t_tx, s_tx, input_shape, mesh):
    """The fresh MPLState and its shardings (teacher and student from fold_in(seed, 0/1))."""
    rng = jax.random.key(config.seed)
    shard = config.get('shard_params', False)
    teacher, t_sh = core.create_train_state(
        teacher_model, t_tx, rng=jax.random.fold_in(rng, 0), input_shape=input_shape,
        use_ema=False, mesh=mesh, shard_params=shard)
    student, s_sh = core.create_train_state(
        student_model, s_tx, rng=jax.random.fold_in(rng, 1), input_shape=input_shape,
        use_ema=bool(config.get('ema_decay', 0.0)), mesh=mesh, shard_params=shard)
    sharding = MPLState(teacher=t_sh, student=s_sh, reward_baseline=core.replicated(mesh))
    state = MPLState(teacher=teacher, student=student, reward_baseline=jnp.zeros((), jnp.float32))
    return jax.device_put(state, sharding), sharding


def _train(config, workdir: str, info, s_cfg) -> dict[str, Any]:
    dtype, total, split = core.compute_dtype(config), config.num_train_steps, config.eval_split
    image_size, channels = config.get('image_size') or s_cfg.input_size[0], s_cfg.input_size[2]
    student_model = models.create_model(config.model, num_classes=info.num_classes, dtype=dtype,
                                        **configuration.model_overrides(config))
    teacher_model = models.create_model(config.teacher_model, num_classes=info.num_classes, dtype=dtype,
                                        **configuration.model_overrides(config, 'teacher_model_kwargs'))
    mesh = core.create_mesh()
    sharding = core.batch_sharding(mesh)
    s_schedule = student_schedule(config)
    s_tx = optim.create_optimizer(config, s_schedule)
    t_conf = teacher_config(config)
    t_schedule = optim.create_schedule(t_conf)
    t_tx = optim.create_optimizer(t_conf, t_schedule)
    use_ema = bool(config.get('ema_decay', 0.0))
    state, state_sharding = _initial_state(config, teacher_model, student_model, t_tx, s_tx,
                                           (1, image_size, image_size, channels), mesh)
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
        max_bad_fraction=config.data.get('max_bad_fraction', 1e-3),
    )
    t0 = time.time()
    try:
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
        logging.info('Final results: %s', json.dumps(results))
        return results
    finally:
        ckpt.close()
        logger.close()


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
        variants = loop.state_variants(st, f'{split}_finetuned', eval_step, use_ema)
        out = evaluator(variants, step)
        return {k.replace('_finetuned', ''): v for k, v in out.items()}

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
