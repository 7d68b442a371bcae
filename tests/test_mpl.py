"""Meta Pseudo Labels: the teacher's gradient, UDA, determinism, resume, real runs.

Tolerances (and why):
- Teacher gradient with the exact reward vs the exact expectation: atol 1e-12 in float64,
  eagerly (the two are the same sum computed in a different order; under jit, XLA:CPU's
  float64 exp/log differ by ~1e-8, which does not matter for the O(eta^2) check).
- First-order (dot-product) reward: its error is O(eta^2), so halving eta must divide it
  by about 4; asserted > 3 per halving.
- UDA against a hand computation: rtol 1e-6 (float32).
- Determinism and resume: bitwise. Data, dropout and sampled pseudo-labels are functions
  of (seed, step), so repeated and resumed runs do identical arithmetic.
"""

from __future__ import annotations

import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import read_jsonl

import input_pipeline
import models
from trainers import core, optim
from trainers import meta_pseudo_labels as mpl
from trainers.checkpointing import load_state_arrays

# ----------------------------------------------------------------------------- the reward


def _linear_problem():
    """Tiny linear teacher and student (4-dim inputs, 3 classes), one unlabeled example."""
    rng = np.random.default_rng(0)
    teacher = nn.Dense(3, param_dtype=jnp.float64)
    student = nn.Dense(3, param_dtype=jnp.float64)
    u = jnp.asarray(rng.standard_normal((1, 4)))
    x_l = jnp.asarray(rng.standard_normal((6, 4)))
    y_l = jnp.asarray([0, 1, 2, 0, 1, 2])
    t_params = teacher.init(jax.random.key(0), u)['params']
    s_params = student.init(jax.random.key(1), u)['params']
    t_params = jax.tree.map(lambda p: p + 0.5 * jnp.asarray(rng.standard_normal(p.shape)), t_params)
    s_params = jax.tree.map(lambda p: p + 0.5 * jnp.asarray(rng.standard_normal(p.shape)), s_params)

    def t_logits(tp):
        return teacher.apply({'params': tp}, u)

    def labeled_loss(sp):
        return core.cross_entropy(student.apply({'params': sp}, x_l), y_l).mean()

    def unlabeled_grad(sp, y):
        return jax.grad(lambda p: core.cross_entropy(student.apply({'params': p}, u), jnp.asarray([y])).mean())(sp)

    def sgd(sp, y, eta):
        return jax.tree.map(lambda p, g: p - eta * g, sp, unlabeled_grad(sp, y))

    return t_params, s_params, t_logits, labeled_loss, unlabeled_grad, sgd


def _teacher_gradients(eta):
    """(g_exact, g from the exact reward, g from the dot-product reward) at step size eta."""
    t_params, s_params, t_logits, labeled_loss, unlabeled_grad, sgd = _linear_problem()
    classes = range(3)

    def expected_loss(tp):  # sum_y p_T(y|u) * L_l(S'(y)), differentiated through p_T
        p = jax.nn.softmax(t_logits(tp))[0]
        return sum(p[y] * labeled_loss(sgd(s_params, y, eta)) for y in classes)

    g_exact = jax.grad(expected_loss)(t_params)
    p = jax.nn.softmax(t_logits(t_params))[0]
    loss_before = labeled_loss(s_params)

    def estimate(reward_of):
        total = jax.tree.map(jnp.zeros_like, t_params)
        for y in classes:
            h = reward_of(y)
            onehot = jax.nn.one_hot(jnp.asarray([y]), 3, dtype=jnp.float64)
            g = jax.grad(lambda tp, onehot=onehot, h=h: mpl.mpl_teacher_loss(t_logits(tp), onehot, h))(
                t_params)
            total = jax.tree.map(lambda a, b, w=p[y]: a + w * b, total, g)
        return total

    g_loss_diff = estimate(
        lambda y: mpl.loss_difference_reward(loss_before, labeled_loss(sgd(s_params, y, eta))))
    g_dot = estimate(lambda y: mpl.dot_product_reward(
        jax.grad(labeled_loss)(sgd(s_params, y, eta)), unlabeled_grad(s_params, y), eta))
    return g_exact, g_loss_diff, g_dot


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


def _diff(a, b):
    return _norm(jax.tree.map(jnp.subtract, a, b))


def test_teacher_mpl_gradient_matches_exact_expectation():
    with jax.enable_x64(True):
        eta = 0.5
        # Eager float64 for the exact check: jitted XLA:CPU exp/log agree only to ~1e-8.
        g_exact, g_loss_diff, _ = _teacher_gradients(jnp.float64(eta))
        assert _norm(g_exact) > 1e-3  # a real signal, not 0 == 0
        # The exact (non-linearised) reward: E_y[-h(y) grad log p_T(y)] == g_exact.
        chex.assert_trees_all_close(g_loss_diff, g_exact, atol=1e-12, rtol=0)
        # The first-order reward: error O(eta^2).
        errors = []
        teacher_gradients = jax.jit(_teacher_gradients)  # traced in float64
        for k in range(3):
            g_exact, _, g_dot = teacher_gradients(jnp.float64(eta / 2**k))
            errors.append(_diff(g_dot, g_exact))
        ratios = [errors[k] / errors[k + 1] for k in range(2)]
        print('dot-product reward errors at eta, eta/2, eta/4:', errors, 'ratios', ratios)
        assert errors[0] > 1e-8
        assert all(r > 3.0 for r in ratios), (errors, ratios)


def test_reward_baseline_moving_average():
    h, b = mpl.apply_reward_baseline(jnp.float32(1.0), jnp.float32(0.5), 0.9)
    np.testing.assert_allclose(b, 0.55, rtol=1e-6)
    np.testing.assert_allclose(h, 0.45, rtol=1e-6)
    h, b = mpl.apply_reward_baseline(jnp.float32(1.0), jnp.float32(0.0), 0.0)
    assert float(h) == 1.0 and float(b) == 0.0


# ----------------------------------------------------------------------------- UDA


def test_uda_loss_hand_computed():
    weak = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    strong = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # Example 0: p = softmax([4, 0, 0]) (temperature 0.5), max p = e^4 / (e^4 + 2) = 0.9647
    # >= 0.6, kept. Example 1: p uniform, max 1/3 < 0.6, masked out.
    e4 = math.exp(4.0)
    p = np.array([e4, 1.0, 1.0]) / (e4 + 2.0)
    e1 = math.e
    q = np.array([e1, 1.0, 1.0]) / (e1 + 2.0)
    expected = float(np.sum(p * np.log(p / q))) / 2  # averaged over both examples
    loss, kept = mpl.uda_loss(weak, strong, threshold=0.6, temperature=0.5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(kept) == 0.5
    # The targets are constants: no gradient into the weak view's logits.
    g_weak, g_strong = jax.grad(lambda w, s: mpl.uda_loss(w, s, 0.6, 0.5)[0], argnums=(0, 1))(weak, strong)
    assert float(jnp.abs(g_weak).max()) == 0.0
    np.testing.assert_allclose(np.asarray(g_strong[0]), (q - p) / 2, rtol=1e-5)
    assert float(jnp.abs(g_strong[1]).max()) == 0.0
    np.testing.assert_allclose(float(mpl.uda_weight(jnp.asarray(150), 8.0, 300)), 4.0)
    np.testing.assert_allclose(float(mpl.uda_weight(jnp.asarray(900), 8.0, 300)), 8.0)


def test_student_wait_schedule():
    from configs.mpl import mnist5k

    config = mnist5k.get_config()
    schedule = mpl.student_schedule(config)
    wait = config.mpl.student_wait_steps
    assert float(schedule(jnp.asarray(0))) == 0.0
    assert float(schedule(jnp.asarray(wait - 1))) == 0.0
    assert float(schedule(jnp.asarray(wait + config.schedule.warmup_steps))) == pytest.approx(
        config.learning_rate, rel=1e-5)


# ----------------------------------------------------------------------------- the step


def _step_setup(pseudo_label='hard_sample', reward='loss_difference'):
    from configs.mpl import mnist5k

    config = mnist5k.get_config()
    config.batch_size = 4
    config.unlabeled_ratio = 2.0
    config.ema_decay = 0.9
    config.mpl.student_wait_steps = 0
    config.mpl.reward_baseline_decay = 0.9
    config.mpl.pseudo_label = pseudo_label
    config.mpl.reward = reward
    model = models.create_model('lenet5', num_classes=10, drop_rate=0.2)
    mesh = core.create_mesh()
    s_sched = mpl.student_schedule(config)
    s_tx = optim.create_optimizer(config, s_sched)
    t_conf = mpl.teacher_config(config)
    t_sched = optim.create_schedule(t_conf)
    t_tx = optim.create_optimizer(t_conf, t_sched)

    def init():
        t, t_sh = core.create_train_state(model, t_tx, rng=jax.random.key(0), input_shape=(1, 32, 32, 1),
                                          use_ema=False, mesh=mesh)
        s, s_sh = core.create_train_state(model, s_tx, rng=jax.random.key(1), input_shape=(1, 32, 32, 1),
                                          use_ema=True, mesh=mesh)
        sh = mpl.MPLState(teacher=t_sh, student=s_sh, reward_baseline=core.replicated(mesh))
        state = mpl.MPLState(teacher=t, student=s, reward_baseline=jnp.zeros((), jnp.float32))
        return jax.device_put(state, sh), sh

    initial, sh = init()

    def fresh():  # copies: the step donates its input state
        return jax.tree.map(jnp.copy, initial), sh

    step = jax.jit(mpl.make_mpl_step(model, model, t_tx, s_tx, t_sched, s_sched, config),
                   in_shardings=(sh, core.batch_sharding(mesh)),
                   out_shardings=(sh, core.replicated(mesh)), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batches = [{
        'image': rng.standard_normal((4, 32, 32, 1)).astype(np.float32),
        'label': rng.integers(0, 10, 4).astype(np.int32),
        'image_uw': rng.standard_normal((8, 32, 32, 1)).astype(np.float32),
        'image_us': rng.standard_normal((8, 32, 32, 1)).astype(np.float32),
    } for _ in range(3)]
    return fresh, step, batches


def _run_steps(fresh, step, batches):
    state, _ = fresh()
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


def test_step_is_deterministic_and_updates_both_networks():
    fresh, step, batches = _step_setup()
    a, metrics = _run_steps(fresh, step, batches)
    b, _ = _run_steps(fresh, step, batches)
    chex.assert_trees_all_equal(a, b)  # bitwise
    init, _ = fresh()
    assert int(a.student.step) == int(a.teacher.step) == 3
    assert _diff(a.teacher.params, init.teacher.params) > 0
    assert _diff(a.student.params, init.student.params) > 0
    assert float(a.reward_baseline) != 0.0
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values()), m
        # The logged reward is the pure function's: h = L_l(S) - L_l(S').
        np.testing.assert_allclose(
            m['reward'], m['student_loss_labeled_before'] - m['student_loss_labeled_after'], rtol=1e-5)
    assert step._cache_size() == 1  # compiled once


def test_soft_pseudo_labels_with_dot_product_reward_run():
    fresh, step, batches = _step_setup(pseudo_label='soft', reward='dot_product')
    state, metrics = _run_steps(fresh, step, batches[:2])
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    assert int(state.student.step) == 2


# ----------------------------------------------------------------------------- real runs


def _small_mnist_config(data_dir, **overrides):
    from configs.mpl import mnist5k

    config = mnist5k.get_config()
    config.data.data_dir = data_dir
    config.batch_size = 16
    config.unlabeled_ratio = 2.0
    config.eval_batch_size = 500
    config.num_train_steps = 6
    config.log_every_steps = 3
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 3
    config.schedule.warmup_steps = 2
    config.teacher_schedule.warmup_steps = 2
    config.mpl.student_wait_steps = 1
    config.mpl.finetune_steps = 0
    config.uda.warmup_steps = 3
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
    # EMA, dropout, sampled pseudo-labels and the reward baseline all in play.
    overrides = {'ema_decay': 0.9, 'mpl.reward_baseline_decay': 0.9}
    ref_dir, cut_dir = str(tmp_path / 'ref'), str(tmp_path / 'cut')
    mpl.train_and_evaluate(_small_mnist_config(data_dir, **overrides), ref_dir)

    original = input_pipeline.create_train_iterator

    def crashing(*args, **kwargs):
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 3:
                raise RuntimeError('simulated crash')
            yield batch

    with monkeypatch.context() as m:
        m.setattr(input_pipeline, 'create_train_iterator', crashing)
        with pytest.raises(RuntimeError, match='simulated crash'):
            mpl.train_and_evaluate(_small_mnist_config(data_dir, **overrides), cut_dir)
    stopped_at, _ = load_state_arrays(os.path.join(cut_dir, 'checkpoints'))
    assert stopped_at == 3
    mpl.train_and_evaluate(_small_mnist_config(data_dir, **overrides), cut_dir)

    _, ref = load_state_arrays(os.path.join(ref_dir, 'checkpoints'), 6)
    _, cut = load_state_arrays(os.path.join(cut_dir, 'checkpoints'), 6)
    assert set(ref) >= {'teacher_params', 'student_params', 'student_ema_params', 'reward_baseline'}
    chex.assert_trees_all_equal(ref, cut)  # bitwise


def test_mnist5k_end_to_end_writes_results(data_dir, tmp_path):
    config = _small_mnist_config(
        data_dir, num_train_steps=10, eval_every_steps=10, log_every_steps=5,
        checkpoint_every_steps=10, **{'mpl.finetune_steps': 4})
    labeled, unlabeled = mpl.data_sources(config)
    # The split of configs/noisy_student/mnist5k.py: 250 labeled, the other 3,750 unlabeled.
    assert len(labeled) == 250 and len(unlabeled) == 3750
    assert np.all(np.bincount(labeled.labels) == 25)
    workdir = str(tmp_path / 'mpl')
    results = mpl.train_and_evaluate(config, workdir)
    saved = json.load(open(os.path.join(workdir, 'results.json')))
    assert saved['top1'] == results['top1'] == results['finetuned_top1']
    for key in ('top1', 'student_top1', 'teacher_top1'):
        assert 0.0 <= saved[key] <= 1.0
    assert saved['num_examples'] == 1000 and saved['trainer'] == 'mpl'
    records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    splits = {(r['split'], r['step']) for r in records}
    assert {('train', 5), ('train', 10), ('test', 10), ('test_teacher', 10),
            ('finetune', 14), ('test_finetuned', 14)} <= splits
    train = [r for r in records if r['split'] == 'train']
    assert {'reward', 'teacher_loss_uda', 'uda_mask_ratio', 'student_loss_unlabeled'} <= set(train[0])
    assert load_state_arrays(os.path.join(workdir, 'checkpoints'))[0] == 10
    assert load_state_arrays(os.path.join(workdir, 'finetune_checkpoints'))[0] == 4
    # A finished run started again does no training and reports the same.
    again = mpl.train_and_evaluate(config, workdir)
    assert again['top1'] == results['top1'] and again['teacher_top1'] == results['teacher_top1']


def test_cifar10_4k_config_one_step_under_mock_data(tmp_path):
    from configs.mpl import cifar10_4k

    config = cifar10_4k.get_config()
    # The real recipe, shrunk only where CI's 2 CPU cores need it.
    config.labeled_per_class = 1
    config.num_train_steps = 1
    config.mpl.finetune_steps = 1
    config.batch_size = 2
    config.unlabeled_ratio = 1.0
    config.eval_batch_size = 4
    config.image_size = 16
    # WRN-10-2: the same blocks, one per group (WRN-28-2's joint step compiles for a minute).
    config.model_kwargs.depth = config.teacher_model_kwargs.depth = 10
    config.data.data_dir = str(tmp_path / 'tfds')
    with tfds.testing.mock_data(num_examples=64):
        results = mpl.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 1 and results['model'] == 'wrn28_2'
    assert math.isfinite(results['loss']) and 0.0 <= results['top1'] <= 1.0
    assert 0.0 <= results['teacher_top1'] <= 1.0
