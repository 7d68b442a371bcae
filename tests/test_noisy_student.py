"""Noisy Student: filtering, resumable pseudo-labelling, the student's loss, a real round."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import input_pipeline
import models
from trainers import core, noisy_student, optim


def test_filter_and_balance_known_answer():
    # 8 examples, 3 classes. Confidences and predictions chosen by hand.
    probs = np.array([
        [0.90, 0.05, 0.05],  # 0 -> class 0, conf .90
        [0.60, 0.30, 0.10],  # 1 -> class 0, conf .60
        [0.40, 0.35, 0.25],  # 2 -> class 0, conf .40 (filtered out at 0.5)
        [0.10, 0.80, 0.10],  # 3 -> class 1, conf .80
        [0.20, 0.70, 0.10],  # 4 -> class 1, conf .70
        [0.05, 0.95, 0.00],  # 5 -> class 1, conf .95
        [0.00, 0.45, 0.55],  # 6 -> class 2, conf .55
        [0.30, 0.30, 0.40],  # 7 -> class 2, conf .40 (filtered out)
    ])
    idx, before, after = noisy_student.filter_and_balance(probs, min_confidence=0.5, images_per_class=2)
    np.testing.assert_array_equal(before, [2, 3, 1])
    # class 0: both confident ones, most confident first; class 1: top-2 of 3; class 2:
    # its single example duplicated.
    np.testing.assert_array_equal(idx, [0, 1, 5, 3, 6, 6])
    np.testing.assert_array_equal(after, [2, 2, 2])
    idx, before, after = noisy_student.filter_and_balance(probs, 0.5, images_per_class=0)
    np.testing.assert_array_equal(idx, [0, 1, 3, 4, 5, 6])
    np.testing.assert_array_equal(after, before)


def test_pseudo_targets_soft_and_hard():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    soft = noisy_student.pseudo_targets(logits, soft=True, temperature=2.0)
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    np.testing.assert_allclose(soft, expected, rtol=1e-6)
    np.testing.assert_array_equal(noisy_student.pseudo_targets(logits, False, 1.0), [[1, 0, 0], [0, 0, 1]])


def _infer(source, out_dir, variables, model, data_dir):
    data = input_pipeline.default_data_config()
    data.data_dir = data_dir
    data.preprocess = 'small'
    return noisy_student.infer_logits(
        model, variables, source, out_dir, data_config=data, dataset='mnist5k', split='train',
        batch_size=64, shard_size=100, image_size=32, channels=1, mean=(0.13,), std=(0.31,),
        teacher_id='test-teacher',
    )


def test_pseudo_labelling_resumes_and_gives_identical_files(data_dir, tmp_path, monkeypatch):
    data = input_pipeline.default_data_config()
    data.data_dir = data_dir
    source = input_pipeline.load_source(data, 'mnist5k', 'train').select(np.arange(350))
    model = models.create_model('lenet5')
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))

    full = _infer(source, str(tmp_path / 'full'), variables, model, data_dir)
    assert full.shape == (350, 10)

    # Interrupt after two of the four shards, then run again.
    calls = {'n': 0}
    original = input_pipeline.create_eval_iterator

    def failing(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt('preempted')
        return original(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, 'create_eval_iterator', failing)
    with pytest.raises(KeyboardInterrupt):
        _infer(source, str(tmp_path / 'cut'), variables, model, data_dir)
    manifest = json.load(open(tmp_path / 'cut' / 'manifest.json'))
    assert sorted(manifest['shards']) == ['0', '1']

    calls['n'] = -100  # no more failures; count the shards recomputed
    resumed = _infer(source, str(tmp_path / 'cut'), variables, model, data_dir)
    assert calls['n'] == -100 + 2  # only shards 2 and 3 were computed again
    np.testing.assert_array_equal(resumed, full)
    for k in range(4):
        a = np.load(tmp_path / 'full' / f'shard-{k:05d}.npz')
        b = np.load(tmp_path / 'cut' / f'shard-{k:05d}.npz')
        np.testing.assert_array_equal(a['logits'], b['logits'])
        np.testing.assert_array_equal(a['index'], b['index'])


def test_student_loss_is_the_weighted_mixture():
    """One step of the shared train step on a labeled + pseudo-labeled toy batch: its loss
    is mean_labeled(CE) + w * mean_pseudo(CE), computed here by hand."""
    model = models.create_model('lenet5', num_classes=4)
    config = ml_collections.ConfigDict(dict(
        seed=0, batch_size=2, num_train_steps=10, learning_rate=0.1, lr_base_batch_size=0,
        schedule=dict(name='constant', warmup_steps=0), label_smoothing=0.0, ema_decay=0.0,
        grad_clip_norm=0.0, optimizer=dict(name='sgd', momentum=0.9, weight_decay=0.0),
    ))
    mesh = core.create_mesh()
    schedule = optim.create_schedule(config)
    tx = optim.create_optimizer(config, schedule)
    state, shardings = core.create_train_state(
        model, tx, rng=jax.random.key(1), input_shape=(1, 32, 32, 1), use_ema=False, mesh=mesh)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 32, 32, 1)).astype(np.float32)
    labels = np.array([1, 3], np.int32)
    pseudo = np.array([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0],
                       [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]], np.float32)
    w = 0.5
    batch = {
        'image': images,
        'label': np.concatenate([labels, pseudo.argmax(1)]).astype(np.int32),
        'targets': np.concatenate([np.eye(4, dtype=np.float32)[labels], pseudo]),
        'weight': np.array([1 / 2, 1 / 2] + [w / 4] * 4, np.float32),
    }
    logits = np.asarray(model.apply({'params': state.params}, images, train=False))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[[0, 1], labels].mean() + w * -(pseudo * logp[2:]).sum(1).mean()

    step = core.jit_train_step(core.make_train_step(model, tx, schedule, config), shardings, mesh)
    _, metrics = step(state, core.to_global(batch, core.batch_sharding(mesh)))
    np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
    assert expected > 0 and not np.isclose(expected, optax.softmax_cross_entropy(
        logits, batch['targets']).mean())  # the weighting matters


def test_one_round_on_mnist5k_end_to_end(data_dir, tmp_path):
    from configs.noisy_student import mnist5k

    config = mnist5k.get_config()
    config.data.data_dir = data_dir
    config.teacher.data.data_dir = data_dir
    config.teacher.num_train_steps = 20
    config.num_train_steps = 10
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 10
    config.eval_batch_size = 500
    config.noisy_student.num_iterations = 1
    config.noisy_student.min_confidence = 0.0
    config.noisy_student.images_per_class = 50
    workdir = str(tmp_path / 'ns')
    results = noisy_student.train_and_evaluate(config, workdir)
    assert len(results['rounds']) == 1
    r0 = results['rounds'][0]
    assert 0.0 <= r0['teacher_top1'] <= 1.0 and 0.0 <= r0['student_top1'] <= 1.0
    assert r0['num_pseudo_labeled'] <= 500
    saved = json.load(open(os.path.join(workdir, 'results.json')))
    assert saved['rounds'] == results['rounds'] and saved['top1'] == r0['student_top1']
    filt = json.load(open(os.path.join(workdir, 'round_0', 'pseudo_labels', 'filter.json')))
    assert filt['num_unlabeled'] == 4000 - 250  # the labeled examples are excluded
    assert sum(filt['histogram_after']) == filt['num_selected']
    # The student trained on labeled + pseudo-labeled batches and was evaluated on all
    # 1,000 held-out digits.
    student = json.load(open(os.path.join(workdir, 'round_0', 'student', 'results.json')))
    assert student['num_examples'] == 1000
    # Running again resumes: nothing is retrained, the same results come back.
    assert noisy_student.train_and_evaluate(config, workdir)['rounds'] == results['rounds']


def test_imagenet_effnet_b0_config_one_step_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from configs.noisy_student import imagenet_effnet_b0

    config = imagenet_effnet_b0.get_config()
    # The paper's setting, shrunk only where CI's 2 CPU cores need it.
    data_dir = str(tmp_path / 'tfds')
    config.data.data_dir = config.teacher.data.data_dir = data_dir
    config.image_size = 32
    # The same blocks, fewer and narrower: full-depth B0 compiles for minutes here.
    for kwargs in (config.model_kwargs, config.teacher.model_kwargs):
        kwargs.depth_mult, kwargs.width_mult = 0.3, 0.25
    config.batch_size = 2
    config.eval_batch_size = 2
    config.num_train_steps = config.teacher.num_train_steps = 1
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    config.noisy_student.unlabeled_ratio = 1.0
    config.noisy_student.min_confidence = 0.0
    config.noisy_student.images_per_class = 1
    config.noisy_student.inference_shard_size = 4
    with tfds.testing.mock_data(num_examples=4):
        results = noisy_student.train_and_evaluate(config, str(tmp_path / 'run'))
    assert [r['round'] for r in results['rounds']] == [0]
    assert 0.0 <= results['rounds'][0]['student_top1'] <= 1.0
    assert results['model'] == 'tf_efficientnet_b0'


def test_teacher_from_converted_weights_file(data_dir, tmp_path):
    """A reference-format weights file (here LeNet-5's own export) serves as the teacher."""
    from configs.noisy_student import mnist5k

    teacher = models.create_model('lenet5', num_classes=10)
    variables = teacher.init(jax.random.key(3), jnp.zeros((1, 32, 32, 1)))
    weights = tmp_path / 'teacher.npz'
    np.savez(weights, **models.export_state_dict('lenet5', variables))

    config = mnist5k.get_config()
    config.data.data_dir = config.teacher.data.data_dir = data_dir
    config.teacher.checkpoint = str(weights)
    config.num_train_steps = 2
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.eval_batch_size = 500
    config.noisy_student.num_iterations = 1
    config.noisy_student.min_confidence = 0.0
    config.noisy_student.images_per_class = 10
    workdir = tmp_path / 'ns'
    results = noisy_student.train_and_evaluate(config, str(workdir))
    assert results['rounds'][0]['teacher_top1'] is None  # not evaluated: restored teacher
    manifest = json.load(open(workdir / 'round_0' / 'pseudo_labels' / 'manifest.json'))
    assert manifest['teacher'].startswith(str(weights))
    # The pseudo-labels are that teacher's predictions.
    logits = np.concatenate([np.load(workdir / 'round_0' / 'pseudo_labels' / f'shard-{k:05d}.npz')['logits']
                             for k in range(4)])
    data = input_pipeline.default_data_config()
    data.data_dir = data_dir
    data.preprocess = 'small'
    source = input_pipeline.load_source(data, 'mnist5k', 'train')
    pool = source.select(np.setdiff1d(np.arange(len(source)), input_pipeline.per_class_indices(source.labels, 25)))
    first = pool.data[:4].astype(np.float32) / 255.0
    first = np.pad(first, ((0, 0), (2, 2), (2, 2), (0, 0)))
    cfg = models.get_model_cfg('lenet5')
    expected = teacher.apply(variables, (first - cfg.mean[0]) / cfg.std[0])
    np.testing.assert_allclose(logits[:4], np.asarray(expected), atol=1e-4)
