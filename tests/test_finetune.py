"""Fine-tuning (trainers/finetune.py, tools/convert_weights.py, trainers/hyperrule.py).

A LeNet-5 (BatchNorm variant, so statistics are transferred too) is trained for a few
steps on mnist5k once per module; the tests restore it into new runs: every variable
loaded, the classifier re-initialised when the class count changes, the strict report,
freezing, resume from the fine-tune's own checkpoint. Reference weights files of one
model per family go through tools/convert_weights.py and back to logits.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config
from flax import traverse_util

import models
from trainers import core, finetune, hyperrule, loop, supervised
from trainers.checkpointing import load_state_arrays


def _config(data_dir, **overrides):
    config = finetune.add_config_fields(small_config(data_dir))
    config.model_kwargs.norm = 'batch'
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope='module')
def pretrained(data_dir, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp('pretrained'))
    supervised.train_and_evaluate(_config(data_dir, ema_decay=0.9), workdir)
    return workdir


def _fresh_state(config, num_classes: int):
    model = models.create_model(config.model, num_classes=num_classes, **supervised.model_overrides(config))
    tx = supervised.optim.create_optimizer(config, supervised.optim.create_schedule(config))
    state, _ = core.create_train_state(
        model, tx, rng=jax.random.key(123), input_shape=(1, 32, 32, 1),
        use_ema=bool(config.ema_decay), mesh=core.create_mesh(),
    )
    return state


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_restore_from_another_run_loads_everything(data_dir, pretrained):
    config = _config(data_dir, init_from=pretrained, ema_decay=0.99)
    state = _fresh_state(config, 10)
    new, summary = finetune.initialize_from_pretrained(state, config, 10)
    _, source = load_state_arrays(os.path.join(pretrained, 'checkpoints'))
    assert summary['head_reinitialised'] == [] and summary['not_loaded'] == []
    for key, value in _flat(source['params']).items():
        np.testing.assert_array_equal(_flat(new.params)[key], value)
        np.testing.assert_array_equal(_flat(new.ema_params)[key], value)  # EMA starts there too
    for key, value in _flat(source['batch_stats']).items():
        np.testing.assert_array_equal(_flat(new.batch_stats)[key], value)
    assert int(new.step) == 0


@pytest.mark.parametrize('head_init', ['zeros', 'default'])
def test_head_reinitialised_when_class_count_differs(data_dir, pretrained, head_init):
    config = _config(data_dir, init_from=pretrained)
    config.finetune.head_init = head_init
    state = _fresh_state(config, 7)
    new, summary = finetune.initialize_from_pretrained(state, config, 7)
    head = set(summary['head_reinitialised'])
    assert head and all(k.startswith('params/') for k in head)
    _, source = load_state_arrays(os.path.join(pretrained, 'checkpoints'))
    src, fresh, got = _flat(source['params']), _flat(state.params), _flat(new.params)
    for key in got:
        path = '/'.join(('params', *key))
        if path in head:
            expected = np.zeros_like(fresh[key]) if head_init == 'zeros' else fresh[key]
            np.testing.assert_array_equal(got[key], expected)
            assert got[key].shape[-1] == 7
        else:
            np.testing.assert_array_equal(got[key], src[key])


def test_head_mismatch_is_an_error_when_reinit_is_never(data_dir, pretrained):
    config = _config(data_dir, init_from=pretrained)
    config.finetune.reinit_head = 'never'
    with pytest.raises(finetune.PretrainedMismatchError, match=r'SHAPE MISMATCH .*\n.*\(10,\) vs \(7,\)|SHAPE MISMATCH'):
        finetune.initialize_from_pretrained(_fresh_state(config, 7), config, 7)


def test_strict_report_lists_every_problem(data_dir, pretrained, tmp_path):
    _, source = load_state_arrays(os.path.join(pretrained, 'checkpoints'))
    ref = models.export_state_dict(
        'lenet5', {'params': source['params'], 'batch_stats': source['batch_stats']}
    )
    dropped = sorted(ref)[0]
    del ref[dropped]
    ref['extra_layer.weight'] = np.zeros((3, 3), np.float32)
    path = str(tmp_path / 'lenet.npz')
    np.savez(path, **ref)

    config = _config(data_dir, init_from=path)
    state = _fresh_state(config, 10)
    with pytest.raises(finetune.PretrainedMismatchError) as err:
        finetune.initialize_from_pretrained(state, config, 10)
    message = str(err.value)
    assert 'MISSING' in message and f'(reference {dropped})' in message
    assert 'UNEXPECTED' in message and 'extra_layer.weight' in message
    assert 'config.finetune.no_load' in message and 'strict=False' in message

    config.finetune.strict = False  # warn and keep the fresh init for the missing entry
    new, summary = finetune.initialize_from_pretrained(state, config, 10)
    assert len(summary['not_loaded']) == 1
    (key,) = [k for k in summary['not_loaded']]
    collection, *path_ = key.split('/')
    fresh = _flat(getattr(state, 'params' if collection == 'params' else 'batch_stats'))
    got = _flat(getattr(new, 'params' if collection == 'params' else 'batch_stats'))
    np.testing.assert_array_equal(got[tuple(path_)], fresh[tuple(path_)])


def test_no_load_keeps_the_fresh_init(data_dir, pretrained):
    config = _config(data_dir, init_from=pretrained)
    config.finetune.no_load = ('^params/c1/',)
    state = _fresh_state(config, 10)
    new, summary = finetune.initialize_from_pretrained(state, config, 10)
    assert summary['not_loaded'] and all(k.startswith('params/c1/') for k in summary['not_loaded'])
    np.testing.assert_array_equal(_flat(new.params)[('c1', 'kernel')], _flat(state.params)[('c1', 'kernel')])


def test_bad_sources_fail_clearly(data_dir, tmp_path):
    config = _config(data_dir, init_from=str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='neither a weights file'):
        finetune.initialize_from_pretrained(_fresh_state(config, 10), config, 10)
    empty = tmp_path / 'empty_workdir'
    empty.mkdir()
    config.init_from = str(empty)
    with pytest.raises(FileNotFoundError, match='no orbax checkpoint'):
        finetune.initialize_from_pretrained(_fresh_state(config, 10), config, 10)
    for name, payload in (('w.npz', b'PK\x03\x04 truncated'), ('w.safetensors', b'\x10\x00'), ('w.pth', b'junk')):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(finetune.WeightsFileError, match='truncated, corrupt'):
            finetune.read_state_dict(str(tmp_path / name))


def test_torch_files_are_read_without_unpickling_objects(tmp_path):
    torch = pytest.importorskip('torch')
    path = str(tmp_path / 'evil.pth')

    class Payload:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    torch.save({'state_dict': {'w': torch.ones(2)}, 'obj': Payload()}, path)
    with pytest.raises(finetune.WeightsFileError, match='Could not read'):
        finetune.read_state_dict(path)
    torch.save({'state_dict': {'module.fc.weight': torch.ones(2, 3)}, 'epoch': 3}, path)
    assert list(finetune.read_state_dict(path)) == ['fc.weight']


def test_finetune_freezes_resumes_and_never_rereads_the_source(data_dir, pretrained, tmp_path, monkeypatch):
    """Frozen params and BN stats stay at the pretrained values; a fine-tune preempted
    (SIGTERM) part-way and restarted ends bitwise where an uninterrupted one does; on
    restart the source is not read (it is deleted before the restart)."""
    import shutil

    from test_trainer import _stop_after

    source = str(tmp_path / 'source')
    shutil.copytree(pretrained, source)
    freeze = ('^(params|batch_stats)/(c1|n1)/',)  # first conv and its BatchNorm

    def config(steps):
        c = _config(data_dir, init_from=source, num_train_steps=steps, checkpoint_every_steps=4,
                    eval_every_steps=8, log_every_steps=4, ema_decay=0.9)
        c.finetune.freeze = freeze
        return c

    straight = str(tmp_path / 'straight')
    supervised.train_and_evaluate(config(8), straight)
    resumed = str(tmp_path / 'resumed')
    with monkeypatch.context() as m:
        _stop_after(m, 5, 'sigterm')
        with pytest.raises(loop.RunInterrupted) as e:
            supervised.train_and_evaluate(config(8), resumed)
    assert 1 <= e.value.step < 8
    shutil.rmtree(source)  # a resumed fine-tune must not need it
    supervised.train_and_evaluate(config(8), resumed)

    _, a = load_state_arrays(os.path.join(straight, 'checkpoints'))
    _, b = load_state_arrays(os.path.join(resumed, 'checkpoints'))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    _, src = load_state_arrays(os.path.join(pretrained, 'checkpoints'))
    frozen = [k for k in _flat(a['params']) if k[0] in ('c1', 'n1')]
    assert frozen
    for k in frozen:
        np.testing.assert_array_equal(_flat(a['params'])[k], _flat(src['params'])[k])
    for k in _flat(a['batch_stats']):
        same = np.array_equal(_flat(a['batch_stats'])[k], _flat(src['batch_stats'])[k])
        assert same == (k[0] == 'n1'), k
    trained = [k for k in _flat(a['params']) if k[0] not in ('c1', 'n1')]
    assert any(not np.array_equal(_flat(a['params'])[k], _flat(src['params'])[k]) for k in trained)


def test_frozen_parameters_get_no_gradient_and_no_update(data_dir):
    """The step stops gradients at frozen parameters: `grad_norm` is the norm of the
    trainable gradients alone, and frozen weights keep their values even under weight
    decay."""
    config = _config(data_dir, weight_decay=0.1)
    config.schedule.warmup_steps = 0  # a non-zero learning rate at step 0
    patterns = finetune.compile_patterns(('^params/(c1|n1)/',), 'freeze')
    model = models.create_model(config.model, num_classes=10, **supervised.model_overrides(config))
    schedule = supervised.optim.create_schedule(config)
    tx = finetune.freeze_optimizer(supervised.optim.create_optimizer(config, schedule), patterns)
    state, _ = core.create_train_state(
        model, tx, rng=jax.random.key(0), input_shape=(1, 32, 32, 1), use_ema=False,
        mesh=core.create_mesh(),
    )
    frozen_params = finetune.frozen_mask(state.params, patterns, 'params')
    assert set(k[0] for k, f in traverse_util.flatten_dict(frozen_params).items() if f) == {'c1', 'n1'}
    step = jax.jit(core.make_train_step(model, tx, schedule, config, frozen_params=frozen_params))
    rng = np.random.default_rng(0)
    batch = {'image': jnp.asarray(rng.normal(size=(8, 32, 32, 1)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}

    def loss(params):  # the same loss, differentiated everywhere
        out, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'],
                             train=True, mutable=['batch_stats'],
                             rngs={'dropout': jax.random.fold_in(jax.random.key(config.seed), 0)})
        return core.example_losses(out, batch, config.get('label_smoothing', 0.0)).mean()

    grads = _flat(jax.grad(loss)(state.params))
    trainable = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for k, g in grads.items() if k[0] not in ('c1', 'n1')))
    everything = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    before = _flat(state.params)
    state, metrics = step(state, batch)
    assert abs(everything - trainable) > 1e-3  # the frozen layers do have gradients
    np.testing.assert_allclose(float(metrics['grad_norm']), trainable, rtol=1e-4)
    changed = {k[0] for k, v in _flat(state.params).items() if not np.array_equal(v, before[k])}
    assert changed and not changed & {'c1', 'n1'}, changed


@pytest.mark.parametrize('frozen', [True, False])
def test_frozen_batchnorm_runs_in_eval_mode_during_training(data_dir, frozen):
    """Frozen BatchNorm layers normalise with their running statistics in the train step,
    as at evaluation, and keep them: with every one frozen (and no dropout) the step's
    loss is the eval-mode loss. Unfrozen, the step uses batch statistics (the control)."""
    config = _config(data_dir)
    model = models.create_model(config.model, num_classes=10, drop_rate=0.0,
                                **supervised.model_overrides(config))
    state = _fresh_state(config, 10)
    # Running statistics far from any batch's, so the two modes give different losses.
    state = state.replace(batch_stats=jax.tree.map(lambda v: v + 3.0, state.batch_stats))
    frozen_stats = jax.tree.map(lambda _: frozen, state.batch_stats)
    rng = np.random.default_rng(0)
    batch = {'image': jnp.asarray(rng.normal(size=(8, 32, 32, 1)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False)
    eval_loss = float(core.cross_entropy(logits, batch['label']).mean())

    step = jax.jit(core.make_train_step(model, optax.sgd(0.0), lambda s: 0.0, config, frozen_stats=frozen_stats))
    new_state, metrics = step(state, batch)
    if frozen:
        np.testing.assert_allclose(float(metrics['loss']), eval_loss, rtol=1e-5)
        for k, v in _flat(new_state.batch_stats).items():
            np.testing.assert_array_equal(v, _flat(state.batch_stats)[k])
    else:
        assert abs(float(metrics['loss']) - eval_loss) > 0.1


def test_other_trainers_reject_init_from(data_dir):
    from configs.mpl import mnist5k

    config = mnist5k.get_config()
    config.init_from = '/somewhere'
    from trainers import meta_pseudo_labels

    with pytest.raises(ValueError, match="Unknown config key.*'init_from'"):
        meta_pseudo_labels.train_and_evaluate(config, '/tmp/unused')


# ----------------------------------------------------------------------------- HyperRule


@pytest.mark.parametrize('n, hw, expected', [
    (100, (8, 8), (160, 128, 500, 100, (200, 300, 400), 0.0)),
    (19_999, (None, None), (512, 480, 500, 100, (200, 300, 400), 0.0)),
    (50_000, (32, 32), (160, 128, 10_000, 500, (3000, 6000, 9000), 0.1)),
    (1_281_167, (None, None), (512, 480, 20_000, 500, (6000, 12_000, 18_000), 0.1)),
    (20_000, (96, 96), (512, 480, 10_000, 500, (3000, 6000, 9000), 0.1)),
])
def test_bit_hyperrule_table(n, hw, expected):
    r = hyperrule.bit_hyperrule(n, hw)
    assert (r.resize, r.crop, r.num_steps, r.warmup_steps, r.boundaries, r.mixup_alpha) == expected


def test_hyperrule_reads_the_split_size(data_dir):
    import input_pipeline

    input_pipeline.get_dataset_info('digits', data_dir)
    config = _config(data_dir, dataset='digits', labeled_per_class=0, hyperrule='bit')
    resolved = hyperrule.resolve(config)
    assert resolved.num_train_steps == 500 and resolved.image_size == 128  # 1,397 8x8 digits
    assert resolved.data.source_size == 160 and resolved.data.train_augment == 'crop'
    assert list(resolved.schedule.boundaries) == [200, 300, 400]
    assert config.num_train_steps == 10  # the input config is left alone


def test_bit_finetune_config_resolves(data_dir):
    from configs import bit_finetune

    config = bit_finetune.get_config()
    config.dataset = 'digits'
    config.data.data_dir = data_dir
    resolved = hyperrule.resolve(config)
    assert resolved.model == 'resnetv2_50x1_bit' and resolved.finetune.head_init == 'zeros'
    assert resolved.image_size == 128 and resolved.num_train_steps == 500
    supervised.validate_config(resolved)


# ----------------------------------------------------------------------------- round trips


def _bit_npz(state: dict) -> dict:
    """timm ResNetV2 names -> the layout of BiT's released .npz (written independently of
    finetune.bit_to_timm, from the BiT repository's description of its files)."""
    out = {}
    for name, v in state.items():
        if name.endswith('num_batches_tracked'):
            continue
        hwio = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v
        parts = name.split('.')
        if parts[0] == 'stem':
            out['resnet/root_block/standardized_conv2d/kernel'] = hwio
        elif parts[0] == 'norm':
            out[f'resnet/group_norm/{"gamma" if parts[1] == "weight" else "beta"}'] = v
        elif parts[0] == 'head':
            out[f'resnet/head/conv2d/{"kernel" if parts[2] == "weight" else "bias"}'] = hwio
        else:
            _, s, _, b, layer, leaf = parts[:6] if len(parts) == 6 else (*parts[:5], parts[-1])
            unit = f'resnet/block{int(s) + 1}/unit{int(b) + 1:02d}'
            if layer == 'downsample':
                out[f'{unit}/a/proj/standardized_conv2d/kernel'] = hwio
                continue
            letter = 'abc'[int(layer[-1]) - 1]
            if layer.startswith('conv'):
                out[f'{unit}/{letter}/standardized_conv2d/kernel'] = hwio
            else:
                out[f'{unit}/{letter}/group_norm/{"gamma" if leaf == "weight" else "beta"}'] = v
    return out


def _reference(name):
    from tools.convert_weights import reference_model

    model, lib = reference_model(name, 1000, state={})  # no auxiliary heads
    assert model is not None, lib
    return model


ROUND_TRIPS = [
    # (model, resolution, file format); one model per family that has a reference
    ('resnet18', 64, 'safetensors'),
    ('resnetv2_50x1_bit', 64, 'bit_npz'),
    ('densenet121', 64, 'pth'),
    ('efficientnet_b0', 64, 'safetensors'),
    ('mobilenetv3_small_100', 64, 'npz'),
    ('mnasnet0_5', 64, 'pth'),
    ('shufflenet_v2_x0_5', 64, 'safetensors'),
    ('squeezenet1_1', 64, 'npz'),
    ('alexnet', 64, 'pth'),
    ('googlenet', 64, 'safetensors'),
    ('legacy_xception', 71, 'npz'),
    pytest.param('vgg11', 32, 'safetensors', marks=pytest.mark.slow),
    pytest.param('inception_v4', 107, 'pth', marks=pytest.mark.slow),
    pytest.param('dm_nfnet_f0', 64, 'npz', marks=pytest.mark.slow),
    pytest.param('legacy_senet154', 64, 'safetensors', marks=pytest.mark.slow),
    pytest.param('nasnetalarge', 43, 'npz', marks=pytest.mark.slow),
]


@pytest.mark.parametrize('name, resolution, fmt', ROUND_TRIPS)
def test_reference_file_to_checkpoint_to_logits(name, resolution, fmt, tmp_path):
    """reference weights file -> tools/convert_weights.py -> orbax checkpoint ->
    config.init_from loader -> our logits == the reference's."""
    torch = pytest.importorskip('torch')
    from parity import randomize_norms

    from tools import convert_weights

    ref = _reference(name).eval()
    randomize_norms(ref)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    path = str(tmp_path / f'weights.{fmt.replace("bit_", "")}')
    if fmt == 'safetensors':
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    elif fmt == 'npz':
        np.savez(path, **state)
    elif fmt == 'bit_npz':
        np.savez(path, **_bit_npz(state))
    else:
        torch.save(ref.state_dict(), path)
    out = str(tmp_path / 'ckpt')
    assert convert_weights.main(['--model', name, '--weights', path, '--out', out, '--no-parity']) == 0

    loaded = finetune.load_pretrained(out, name)
    variables = traverse_util.unflatten_dict(loaded.arrays)
    x = np.random.default_rng(0).standard_normal((1, 3, resolution, resolution)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x))
        expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    model = models.create_model(name)
    got = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    err = float(np.max(np.abs(got - expected))) / max(1.0, float(np.max(np.abs(expected))))
    assert err < 1e-4, f'{name}: relative logit error {err:.3g}'


def test_convert_tool_parity_and_failures(tmp_path, capsys):
    torch = pytest.importorskip('torch')
    from safetensors.numpy import save_file

    from tools import convert_weights

    ref = _reference('resnet18')
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    good = str(tmp_path / 'r18.safetensors')
    save_file(state, good)
    assert convert_weights.main(['--model', 'resnet18', '--weights', good, '--out', str(tmp_path / 'a'),
                                 '--resolution', '64']) == 0
    assert 'parity vs timm at 64px' in capsys.readouterr().out
    # A file for another model: non-zero exit, every mismatch listed, nothing written.
    assert convert_weights.main(['--model', 'resnet34', '--weights', good, '--out', str(tmp_path / 'b')]) == 1
    err = capsys.readouterr().err
    assert 'missing' in err and 'layer1.2.conv1.weight' in err
    assert not os.path.exists(tmp_path / 'b')
    # Truncated file.
    bad = str(tmp_path / 'cut.safetensors')
    with open(good, 'rb') as f, open(bad, 'wb') as g:
        g.write(f.read()[:5000])
    assert convert_weights.main(['--model', 'resnet18', '--weights', bad, '--out', str(tmp_path / 'c')]) == 1
    assert 'truncated' in capsys.readouterr().err
    del torch


def test_init_from_hub_goes_through_timm(monkeypatch):
    timm = pytest.importorskip('timm')
    calls = []
    create = timm.create_model

    def offline(model_id, pretrained=False, **kwargs):
        calls.append((model_id, pretrained))
        return create(model_id.split('.')[0], pretrained=False, **kwargs)  # no download in tests

    monkeypatch.setattr(timm, 'create_model', offline)
    loaded = finetune.load_from_hub('resnet18.a1_in1k', 'resnet18')
    assert calls == [('resnet18.a1_in1k', True)]
    assert loaded.unmatched == [] and ('params', 'fc', 'kernel') in loaded.arrays
    assert loaded.arrays[('params', 'conv1', 'kernel')].shape == (7, 7, 3, 64)  # HWIO


def test_sharded_and_multi_process_finetune_from_the_command_line(data_dir, pretrained, tmp_path):
    """train.py fine-tunes on 1 process x 4 devices and on 2 processes x 2 devices
    (jax.distributed on 127.0.0.1): the pretrained arrays are placed in the state's
    sharding across processes, and both runs see the same losses."""
    import json

    from conftest import read_jsonl, run_train, run_train_multiprocess

    def args(workdir):
        return [
            '--config', 'configs/finetune/digits.py', '--workdir', workdir,
            f'--config.init_from={pretrained}', f'--config.data.data_dir={data_dir}',
            '--config.model_kwargs.norm=batch', '--config.finetune.reinit_head=always',
            '--config.num_train_steps=4', '--config.batch_size=16', '--config.eval_batch_size=400',
            '--config.log_every_steps=1', '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4',
        ]

    single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
    run_train(args(single), devices=4)  # also prepares `digits` before two processes read it
    run_train_multiprocess(args(multi), num_processes=2, devices=2)
    for workdir in (single, multi):
        with open(os.path.join(workdir, 'init_from.json')) as f:
            summary = json.load(f)
        assert summary['head_reinitialised'] == ['params/fc/bias', 'params/fc/kernel']
        assert summary['loaded'] > 0 and summary['not_loaded'] == []
    losses = [
        np.array([r['loss'] for r in read_jsonl(os.path.join(w, 'metrics.jsonl')) if r['split'] == 'train'])
        for w in (single, multi)
    ]
    assert len(losses[0]) == len(losses[1]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_any_step_of_a_workdir_can_be_the_source(pretrained):
    steps = sorted(int(s) for s in os.listdir(os.path.join(pretrained, 'checkpoints')) if s.isdigit())
    assert len(steps) >= 2  # keep_checkpoints=2 in the small config
    older, newest = steps[0], steps[-1]
    assert finetune.load_pretrained(pretrained, 'lenet5').description.endswith(
        f"step {newest} of model 'lenet5'")
    by_folder = finetune.load_pretrained(os.path.join(pretrained, 'checkpoints', str(older)), 'lenet5')
    by_step = finetune.load_pretrained(pretrained, 'lenet5', step=older)
    assert f'step {older}' in by_folder.description
    for key, value in by_folder.arrays.items():
        np.testing.assert_array_equal(value, by_step.arrays[key])
    assert any(not np.array_equal(v, finetune.load_pretrained(pretrained, 'lenet5').arrays[k])
               for k, v in by_step.arrays.items())
    with pytest.raises(FileNotFoundError, match='No checkpoint for step 7'):
        finetune.load_pretrained(pretrained, 'lenet5', step=7)
    with pytest.raises(ValueError, match='give one of the two'):
        finetune.load_pretrained(os.path.join(pretrained, 'checkpoints', str(older)), 'lenet5', step=newest)
