"""The Meta Pseudo Labels step (trainers/meta_pseudo_labels.py explains the method).

Pure functions of arrays: the reward forms, the teacher's MPL and UDA terms, the
pseudo-labels, and `make_mpl_step`, which updates teacher and student in one step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxnets_errors import ConfigError
from trainers import core

PSEUDO_LABELS = ('hard_sample', 'hard_argmax', 'soft')


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


def _mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
    """The mean over the examples whose `valid` is 1 (all when None)."""
    return values.mean() if valid is None else core.batch_loss(values, {'valid': valid})


def mpl_teacher_loss(teacher_logits_u: jax.Array, pseudo_labels: jax.Array, reward,
                     valid: jax.Array | None = None) -> jax.Array:
    """The teacher's MPL term h * mean_i CE(y_hat_i, T(u_i)).

    Args:
      teacher_logits_u: (n, K) teacher logits on the (strongly augmented) unlabeled images.
      pseudo_labels: (n, K) one-hot pseudo-labels (constants).
      reward: scalar h; no gradient flows through it.

    Its gradient, -h * grad_T log p_T(y_hat | u), is the REINFORCE estimate of the
    gradient of E_{y_hat ~ p_T}[L_l(S'(y_hat))] when h = L_l(S) - L_l(S').
    """
    ce = optax.softmax_cross_entropy(teacher_logits_u, jax.lax.stop_gradient(pseudo_labels))
    return jax.lax.stop_gradient(reward) * _mean(ce, valid)


def soft_mpl_teacher_loss(teacher_probs_u: jax.Array, coefficients: jax.Array, eta,
                          valid: jax.Array | None = None) -> jax.Array:
    """First-order change of L_l for soft pseudo-labels: eta * mean_i sum_k p_ik c_ik.

    Args:
      teacher_probs_u: (n, K) the student's soft targets as a function of T.
      coefficients: (n, K) c_ik = grad_S log softmax(S(u_i))_k . grad_S L_l(S') (constants).
      eta: the student's learning rate.
    """
    c = jax.lax.stop_gradient(coefficients)
    return eta * _mean(jnp.sum(teacher_probs_u * c, axis=-1), valid)


def uda_loss(logits_weak: jax.Array, logits_strong: jax.Array, threshold: float, temperature: float,
             valid: jax.Array | None = None):
    """UDA consistency (Xie et al. 2020) as the MPL code uses it.

    Targets p = stop_gradient(softmax(logits_weak / temperature)); examples with
    max(p) < threshold are masked out; loss = sum_i mask_i KL(p_i || softmax(logits_strong_i))
    / n (the mean over *all* n unlabeled examples, as the official code divides by the
    unlabeled batch size). Returns (loss, fraction of examples kept).
    """
    p = jax.lax.stop_gradient(jax.nn.softmax(logits_weak.astype(jnp.float32) / temperature))
    mask = (jnp.max(p, axis=-1) >= threshold).astype(jnp.float32)
    if valid is not None:  # undecodable images' stand-ins are never consistent targets
        mask = mask * valid
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


def _student_step(model, tx, s: core.TrainState, batch: dict, targets, rngs, *, label_smoothing: float,
                  use_dot: bool, soft: bool, eta) -> dict:
    """The student's optimizer step on the pseudo-labels, its labeled loss before and
    after it, and what the teacher's reward needs (the raw reward; for soft labels the
    coefficients c of `soft_mpl_teacher_loss`)."""
    x_l, y_l, u_s = batch['image'], batch['label'], batch['image_us']
    n_u = u_s.shape[0]
    s_rng, s2_rng = rngs
    v_l, v_u = batch.get('valid'), batch.get('valid_u')

    def forward(params):
        return _apply(model, params, s.batch_stats, jnp.concatenate([u_s, x_l]), s_rng)

    def loss(params):
        logits, stats = forward(params)
        loss_u = _mean(optax.softmax_cross_entropy(logits[:n_u], _smooth(targets, label_smoothing)), v_u)
        return loss_u, (_mean(core.cross_entropy(logits[n_u:], y_l), v_l), stats)

    (loss_u, (before, stats)), g_u = jax.value_and_grad(loss, has_aux=True)(s.params)
    updates, opt_state = tx.update(g_u, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)

    def labeled_after(p):
        logits, _ = _apply(model, p, stats, x_l, s2_rng)
        return _mean(core.cross_entropy(logits, y_l), v_l)

    out = dict(loss_u=loss_u, before=before, stats=stats, g_u=g_u, params=params, opt_state=opt_state)
    if use_dot:
        out['after'], g_l = jax.value_and_grad(labeled_after)(params)
        out['reward'] = dot_product_reward(g_l, g_u, eta)
        if soft:
            _, out['coefficients'] = jax.jvp(
                lambda p: jax.nn.log_softmax(forward(p)[0][:n_u]), (s.params,), (g_l,))
    else:
        out['after'] = labeled_after(params)
        out['reward'] = loss_difference_reward(before, out['after'])
    return out


def _teacher_objective(logits, batch: dict, targets, student: dict, advantage, eta, w_uda, *,
                       config: ml_collections.ConfigDict):
    """The teacher's loss as a function of its logits on [x_l, u_w, u_s]."""
    mpl, uda = config.mpl, config.uda
    label_smoothing = config.get('label_smoothing', 0.0)
    n_l, n_u = batch['image'].shape[0], batch['image_uw'].shape[0]
    lg_l, lg_w, lg_s = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
    v_l, v_u = batch.get('valid'), batch.get('valid_u')
    sup = _mean(core.cross_entropy(lg_l, batch['label'], label_smoothing), v_l)
    cons, kept = uda_loss(lg_w, lg_s, uda.threshold, uda.temperature, v_u)
    if mpl.pseudo_label == 'soft':
        probs = _smooth(jax.nn.softmax(lg_s), label_smoothing)
        mpl_term = mpl.reward_sign * soft_mpl_teacher_loss(probs, student['coefficients'], eta, v_u)
    else:
        mpl_term = mpl_teacher_loss(lg_s, targets, advantage, v_u)
    return sup + w_uda * cons + mpl_term, (sup, cons, kept, mpl_term)


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
    ema_decay = config.get('ema_decay', 0.0)
    options = dict(label_smoothing=config.get('label_smoothing', 0.0),
                   use_dot=mpl.reward == 'dot_product', soft=mpl.pseudo_label == 'soft')

    def step_fn(state: MPLState, batch: dict) -> tuple[MPLState, dict]:
        step = state.student.step
        t_rng, s_rng, s2_rng, sample_rng = jax.random.split(jax.random.fold_in(base_rng, step), 4)
        n_l, n_u = batch['image'].shape[0], batch['image_uw'].shape[0]
        t, s = state.teacher, state.student
        # 1. The teacher, once, on everything; its gradient comes back through t_vjp.
        images = jnp.concatenate([batch['image'], batch['image_uw'], batch['image_us']])
        t_logits, t_vjp, t_stats = jax.vjp(
            lambda p: _apply(teacher_model, p, t.batch_stats, images, t_rng), t.params, has_aux=True)
        targets = pseudo_label_targets(mpl.pseudo_label, t_logits[n_l + n_u:], sample_rng)
        # 2. The student's step on the pseudo-labels and the reward.
        eta = student_schedule(step)
        st = _student_step(student_model, student_tx, s, batch, targets, (s_rng, s2_rng), eta=eta, **options)
        reward = mpl.reward_sign * st['reward']
        advantage, baseline = apply_reward_baseline(reward, state.reward_baseline, mpl.reward_baseline_decay)
        # 3. The teacher's step, its gradient through the logits of step 1.
        w_uda = uda_weight(step, uda.weight, uda.warmup_steps)
        (t_loss, (t_sup, t_uda, kept, t_mpl)), g_logits = jax.value_and_grad(_teacher_objective, has_aux=True)(
            t_logits, batch, targets, st, advantage, eta, w_uda, config=config)
        (g_t,) = t_vjp(g_logits)
        t_updates, t_opt_state = teacher_tx.update(g_t, t.opt_state, t.params)
        teacher = t.replace(step=t.step + 1, params=optax.apply_updates(t.params, t_updates),
                            batch_stats=t_stats, opt_state=t_opt_state)
        student = s.replace(step=s.step + 1, params=st['params'], batch_stats=st['stats'],
                            opt_state=st['opt_state'])
        if ema_decay:
            student = student.replace(**core.ema_update(ema_decay, s, st['params'], st['stats']))
        metrics = {
            'loss': t_loss, 'teacher_loss_labeled': t_sup, 'teacher_loss_uda': t_uda,
            'teacher_loss_mpl': t_mpl, 'uda_mask_ratio': kept, 'uda_weight': w_uda,
            'student_loss_unlabeled': st['loss_u'], 'student_loss_labeled_before': st['before'],
            'student_loss_labeled_after': st['after'], 'reward': reward, 'reward_baseline': baseline,
            'teacher_top1': core.topk_correct(t_logits[:n_l], batch['label'], 1).mean(),
            'grad_norm': optax.global_norm(g_t), 'student_grad_norm': optax.global_norm(st['g_u']),
            'param_norm': optax.global_norm(st['params']), 'lr': eta, 'teacher_lr': teacher_schedule(step),
        }
        if 'valid' in batch:
            metrics['skipped'] = jnp.sum(1.0 - batch['valid']) + jnp.sum(1.0 - batch['valid_u'])
        return MPLState(teacher=teacher, student=student, reward_baseline=baseline), metrics

    return step_fn
