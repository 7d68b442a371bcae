"""Command-line odds and ends: tools/plot.py, timm's model names, user errors in train.py
(one message, no traceback), progress and compilation lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, REPO, small_config
from modeltest import abstract_variables, num_params

import models
from tools import plot
from trainers import progress


@pytest.fixture(scope='module')
def timm():
    return pytest.importorskip('timm')


@pytest.fixture(scope='module')
def torchvision():
    return pytest.importorskip('torchvision')


# ------------------------------------------------------------------------------ plot.py


def _write_run(workdir, steps, *, lr0=0.1, resumed_at=None):
    """A metrics.jsonl as MetricsLogger writes it: train rows every step in `steps`, a
    `test` row at the last; `resumed_at` repeats the rows from that step (a resume)."""
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for s in steps:
        rows.append({'step': s, 'split': 'train', 'loss': 2.0 / s, 'top1': 1 - 1 / s, 'lr': lr0 / s,
                     'grad_norm': 1.0, 'images_per_sec': 1000.0 + s, 'wall_time': float(s)})
    rows.append({'step': steps[-1], 'split': 'test', 'loss': 0.5, 'top1': 0.9, 'top5': 1.0,
                 'num_examples': 100, 'wall_time': 99.0})
    if resumed_at is not None:
        rows += [dict(r, loss=r['loss'] / 2) for r in rows if r['step'] >= resumed_at]
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(workdir)


def test_plot_figure_has_one_line_per_run_per_panel(tmp_path):
    a = _write_run(tmp_path / 'x' / 'run', [10, 20, 30], resumed_at=20)
    b = _write_run(tmp_path / 'y' / 'run', [10, 20, 30, 40], lr0=0.2)
    labels = plot.run_labels([a, b])
    assert labels == ['x/run', 'y/run']  # same workdir name: parents tell them apart
    runs = dict(zip(labels, map(plot.load_metrics, [a, b]), strict=True))
    # The resumed run's repeated rows count once, the later values winning.
    assert [r['step'] for r in runs['x/run'] if r['split'] == 'train'] == [10, 20, 30]
    fig = plot.make_figure(runs)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {'loss', 'top-1 accuracy', 'learning rate', 'training images/s'}
    both = {'x/run|train', 'x/run|test', 'y/run|train', 'y/run|test'}
    for title, expected in [('loss', both), ('top-1 accuracy', both),
                            ('learning rate', {'x/run|train', 'y/run|train'}),
                            ('training images/s', {'x/run|train', 'y/run|train'})]:
        gids = [line.get_gid() for line in panels[title].get_lines()]
        assert sorted(gids) == sorted(expected), title
    loss = {line.get_gid(): line for line in panels['loss'].get_lines()}
    np.testing.assert_allclose(loss['x/run|train'].get_ydata(), [2 / 10, 1 / 20, 1 / 30])
    np.testing.assert_allclose(loss['y/run|train'].get_xdata(), [10, 20, 30, 40])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ['x/run', 'y/run', 'train', 'test']


def test_plot_cli_writes_png_and_svg(tmp_path):
    a = _write_run(tmp_path / 'baseline', [100, 200, 300])
    b = _write_run(tmp_path / 'wider', [100, 200, 300], lr0=0.3)
    out = tmp_path / 'figs' / 'curves.png'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'plot.py'), a, b,
                           '--output', str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert out.stat().st_size > 20_000
    svg = (tmp_path / 'figs' / 'curves.svg').read_text()
    assert '<svg' in svg and 'baseline' in svg and 'wider' in svg

    missing = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'plot.py'),
                              str(tmp_path / 'nope')], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert 'no metrics.jsonl' in missing.stderr and 'Traceback' not in missing.stderr


# ---------------------------------------------------------------------------- timm names

# Registered names that timm.list_models() lacks: where the name comes from, and timm's
# name for the same model where timm has one (it must then be an alias).
NOT_TIMM_NAMES = {
    'alexnet': ('torchvision', None),
    'googlenet': ('torchvision', None),
    'mnasnet0_5': ('torchvision', 'mnasnet_050'),
    'mnasnet0_75': ('torchvision', 'mnasnet_075'),
    'mnasnet1_0': ('torchvision', 'mnasnet_100'),
    'mnasnet1_3': ('torchvision', None),  # timm's mnasnet_140 is 1.4x wide
    'mobilenet_v2': ('torchvision', 'mobilenetv2_100'),
    'shufflenet_v2_x0_5': ('torchvision', None),
    'shufflenet_v2_x1_0': ('torchvision', None),
    'shufflenet_v2_x1_5': ('torchvision', None),
    'shufflenet_v2_x2_0': ('torchvision', None),
    'squeezenet1_0': ('torchvision', None),
    'squeezenet1_1': ('torchvision', None),
    # Neither library has these; timm's densenet264d has a deep stem, timm's MobileNet-V1
    # comes at widths 1.0 and 1.25 only.
    **{n: ('own', None) for n in (
        'alexnet_original', 'bn_inception', 'densenet264', 'densenet_bc_100_12', 'lenet5',
        'mobilenetv1_025', 'mobilenetv1_050', 'mobilenetv1_075', 'nasnetamobile',
        'overfeat_accurate', 'overfeat_fast', 'resnet_tiny', 'shufflenet_v1_g1',
        'shufflenet_v1_g2', 'shufflenet_v1_g3', 'shufflenet_v1_g4', 'shufflenet_v1_g8',
        'wrn28_2', 'wrn28_10')},
}


def test_registry_names_follow_timm_and_torchvision(timm, torchvision):
    timm_names = set(timm.list_models())
    deprecated = timm.models.get_deprecated_models()  # old name -> 'arch[.weights tag]'
    registered = models.list_models()
    assert {n for n in registered if n not in timm_names} == set(NOT_TIMM_NAMES)
    for name, (source, timm_name) in NOT_TIMM_NAMES.items():
        if source == 'torchvision':
            assert name in torchvision.models.list_models(), name
        if timm_name is not None:
            assert timm_name in timm_names and models.MODEL_ALIASES[timm_name] == name
    for alias, target in models.MODEL_ALIASES.items():
        assert target in registered and alias not in registered
        assert alias in timm_names or alias in deprecated, alias
    # Every old timm name that means one of our architectures (no weight tag) is an alias.
    ours = set(registered) | set(models.MODEL_ALIASES)
    expected = {old for old, new in deprecated.items() if '.' not in new and new in ours}
    assert expected <= set(models.MODEL_ALIASES)
    assert expected == {'xception', 'mnasnet_a1', 'mnasnet_b1', 'efficientnet_b2a', 'efficientnet_b3a'}


def test_aliases_are_listed_on_request_and_convert_weights(torchvision):
    assert 'mnasnet_050' not in models.list_models()  # callers iterating the registry
    assert models.list_models('mnasnet*', include_aliases=True) == [
        'mnasnet0_5', 'mnasnet0_75', 'mnasnet1_0', 'mnasnet1_3', 'mnasnet_050', 'mnasnet_075',
        'mnasnet_100', 'mnasnet_a1', 'mnasnet_b1']
    assert models.resolve_model_name('mobilenetv2_100') == 'mobilenet_v2'
    assert models.resolve_model_name('resnet50') == 'resnet50'
    with pytest.raises(models.UnknownModelError, match='mnasnet_050'):
        models.create_model('mnasnet_05')
    # Weights under an alias: the registered model's reference naming (torchvision's here).
    state_dict = {k: v.numpy() for k, v in torchvision.models.mnasnet0_5().state_dict().items()}
    via_alias = models.convert_state_dict('mnasnet_050', state_dict)
    direct = models.convert_state_dict('mnasnet0_5', state_dict)
    jax.tree.map(np.testing.assert_array_equal, via_alias, direct)


@pytest.mark.parametrize('alias', sorted(models.MODEL_ALIASES))
def test_alias_has_timms_parameter_count(alias, timm):
    target = models.MODEL_ALIASES[alias]
    model = models.create_model(alias)
    assert type(model) is type(models.create_model(target))
    assert models.get_model_cfg(alias) == models.get_model_cfg(target)
    assert models.get_model_family(alias) == models.get_model_family(target)
    ours = num_params(abstract_variables(model, (1, *models.get_model_cfg(alias).input_size))['params'])
    reference = timm.create_model(alias, pretrained=False)  # old names too (with a warning)
    assert ours == sum(p.numel() for p in reference.parameters())


# --------------------------------------------------------------------- train.py errors


def _train(args, cwd, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=FAST_COMPILE_FLAGS)
    env.pop('FLAXNETS_VERBOSE', None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=180)


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('train.py: error: '), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


# Each case runs from an empty directory: --config is found relative to the repository.
@pytest.mark.parametrize('override, needles', [
    ('--config.model=resnt50', ["Unknown model 'resnt50'", 'resnet50']),
    ('--config.dataset=mnist6k', ["Unknown dataset 'mnist6k'", 'mnist5k']),
    ('--config.lable_smoothing=0.1', ['--config.lable_smoothing', 'label_smoothing',
                                      os.path.join(REPO, 'configs', 'default.py')]),
])
def test_user_error_is_one_line_without_traceback(override, needles, tmp_path, data_dir):
    proc = _train(['--config', 'configs/default.py', '--workdir', str(tmp_path / 'run'),
                   f'--config.data.data_dir={data_dir}', override], cwd=tmp_path)
    _assert_user_error(proc, *needles)
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_missing_config_file_and_verbose(tmp_path):
    args = ['--config', 'configs/defualt.py', '--workdir', str(tmp_path / 'run')]
    _assert_user_error(_train(args, cwd=tmp_path), "'configs/defualt.py' not found",
                       'Did you mean configs/default.py?')
    for verbose in (_train([*args, '--verbose'], cwd=tmp_path),
                    _train(args, cwd=tmp_path, env_extra={'FLAXNETS_VERBOSE': '1'})):
        assert verbose.returncode != 0
        assert 'Traceback' in verbose.stderr and 'InputNotFoundError' in verbose.stderr


def test_unexpected_error_keeps_its_traceback(tmp_path):
    # train.py's handler around a main() that crashes (a bug, not a user error); a config
    # without imports keeps TensorFlow out of this process.
    config = tmp_path / 'bare.py'
    config.write_text('import ml_collections\n\n\ndef get_config():\n'
                      "    return ml_collections.ConfigDict({'trainer': 'supervised'})\n")
    code = (
        'import sys, train\n'
        'def crash(argv):\n'
        "    raise RuntimeError('a bug, not a user error')\n"
        'train.main = crash\n'
        "train.run(['train.py', '--config', sys.argv[1], '--workdir', sys.argv[2]])\n"
    )
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
    env.pop('FLAXNETS_VERBOSE', None)
    proc = subprocess.run([sys.executable, '-c', code, str(config), str(tmp_path / 'run')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'Traceback' in proc.stderr and 'RuntimeError: a bug, not a user error' in proc.stderr


def test_user_errors_share_one_base_and_keep_their_builtin_types(data_dir):
    import input_pipeline
    from flaxnets_errors import ConfigError, InputNotFoundError, UserError
    from trainers import checkpointing, finetune, loop, optim

    for error, builtin in [
        (models.UnknownModelError, ValueError), (models.registry.ModelOverrideError, TypeError),
        (models.ConversionError, ValueError), (input_pipeline.DatasetNotAvailableError, RuntimeError),
        (finetune.WeightsFileError, ValueError), (finetune.PretrainedMismatchError, ValueError),
        (checkpointing.CheckpointMismatchError, RuntimeError),
        (loop.NonFiniteLossError, FloatingPointError), (ConfigError, ValueError),
        (InputNotFoundError, FileNotFoundError),
    ]:
        assert issubclass(error, UserError) and issubclass(error, builtin), error
    # A bad value: train.py prints the message of a ConfigError like any UserError.
    config = small_config(data_dir, **{'optimizer.name': 'adamx'})
    with pytest.raises(ConfigError, match="Unknown optimizer 'adamx'.*sgd"):
        optim.create_optimizer(config, optim.create_schedule(config))
    # A split the dataset lacks fails before any data is read, naming the splits.
    with pytest.raises(ConfigError, match=r"Split 'tset'.*'train', 'test'"):
        input_pipeline.load_source(config.data, 'mnist5k', 'tset')


# ----------------------------------------------------------------------------- progress


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_is_silent_for_short_passes_and_rate_limited(caplog):
    clock = _Clock()
    with caplog.at_level(logging.INFO, logger='absl'):
        quick = progress.Progress('Evaluation (test)', 10, after_s=5, every_s=10, clock=clock)
        for _ in range(10):
            clock.t += 0.1
            quick.update()
        quick.close()
        assert quick.lines == 0 and 'Evaluation' not in caplog.text

        clock.t = 0.0
        slow = progress.Progress('Pseudo-labelling', 1000, 'images', after_s=5, every_s=10, clock=clock)
        for _ in range(100):  # 10 images per second for 100 s
            clock.t += 1.0
            slow.update(10, wait=jnp.ones(()))
        assert slow.lines == 10  # at 5 s, then every 10 s
        clock.t = 40.0
        slow.done = 400
        assert slow.describe() == (
            'Pseudo-labelling: 400/1,000 images (40%) | 10.0 images/s | 0:00:40 elapsed | ETA 0:01:00')
        slow.done = 1000
        clock.t = 100.0
        slow.close()
    assert 'Pseudo-labelling: 50/1,000 images (5%)' in caplog.text
    assert 'Pseudo-labelling: done, 1,000 images in 0:01:40.' in caplog.text


def test_first_call_of_a_step_logs_its_compilation(caplog):
    step = progress.LogCompilation(jax.jit(lambda x: x * 2), 'train step')
    with caplog.at_level(logging.INFO, logger='absl'):
        np.testing.assert_array_equal(step(jnp.arange(3)), [0, 2, 4])
        step(jnp.arange(3))
    assert caplog.text.count('Compiling the train step') == 1
    assert caplog.text.count('Compiled the train step in') == 1
    assert step._cache_size() == 1  # the jitted function's own attributes still work
