"""tools/evaluate.py and tools/predict.py, run as a user runs them, on two real short runs.

- `digits`: LeNet-5 on mnist5k for 60 steps with EMA; its final evaluation in
  results.json is what evaluate.py must reproduce (to 1e-6: the same eval step, batch
  and data, so in practice bitwise) without touching results.json.
- `folder`: LeNet-5 on a `folder:` dataset of real digit PNGs in class folders named
  'one', 'two' and 'zero'; its labels.json and predict.py's class names must be those.

Each run is trained once per test session and shared by the xdist workers (a file lock
in the session's base directory); the user-error cases that need no run come first, so one
worker runs them while the other trains.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, REPO, read_jsonl, small_config

FOLDER_CLASSES = {'zero': 0, 'one': 1, 'two': 2}  # folder name -> mnist digit


def run_tool(tool: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tools', tool), *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{tool} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return proc


def _shared(tmp_path_factory, name: str, build) -> str:
    """`build(path)` once per test session, whichever xdist worker asks first; the others
    wait on a file lock and reuse the result."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is a folder of the session's own base directory.
    shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
    path, done = shared / f'eval_predict_{name}', shared / f'eval_predict_{name}.done'
    with open(shared / f'eval_predict_{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                build(str(path))
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(path)


@pytest.fixture(scope='session')
def shared_data_dir(tmp_path_factory) -> str:
    import input_pipeline

    return _shared(tmp_path_factory, 'tfds', lambda p: input_pipeline.get_dataset_info('mnist5k', p))


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory, shared_data_dir) -> str:
    """LeNet-5 on mnist5k, 60 steps, EMA on, evaluated and checkpointed at 30 and 60."""
    from trainers import supervised

    config = small_config(shared_data_dir, num_train_steps=60, eval_every_steps=30,
                          log_every_steps=30, checkpoint_every_steps=30, ema_decay=0.9)
    return _shared(tmp_path_factory, 'digits_run',
                   lambda p: supervised.train_and_evaluate(config, p))


@pytest.fixture(scope='session')
def digit_folder(tmp_path_factory, shared_data_dir) -> str:
    """root/{train,test}/{zero,one,two}/*.png from real mnist5k digits (20 + 5 per class)."""

    def build(root):
        from PIL import Image

        import input_pipeline

        config = input_pipeline.default_data_config()
        config.data_dir = shared_data_dir
        for split, per_class in (('train', 20), ('test', 5)):
            source = input_pipeline.load_source(config, 'mnist5k', split)
            for name, digit in FOLDER_CLASSES.items():
                os.makedirs(os.path.join(root, split, name))
                for j, i in enumerate(np.nonzero(source.labels == digit)[0][:per_class]):
                    Image.fromarray(source.data[i][..., 0]).save(
                        os.path.join(root, split, name, f'{j}.png'))

    return _shared(tmp_path_factory, 'digit_folder', build)


@pytest.fixture(scope='session')
def folder_run(tmp_path_factory, shared_data_dir, digit_folder) -> str:
    """LeNet-5 on the `folder:` dataset, 10 steps, no EMA."""
    from trainers import supervised

    config = small_config(shared_data_dir, dataset=f'folder:{digit_folder}', num_train_steps=10,
                          eval_batch_size=16)
    return _shared(tmp_path_factory, 'folder_run', lambda p: supervised.train_and_evaluate(config, p))


def _results(workdir: str) -> dict:
    with open(os.path.join(workdir, 'results.json')) as f:
        return json.load(f)


# ------------------------------------------------------------------ user errors


def _user_error_cases(tmp_path) -> dict:
    """case -> (command, expected message, the run it needs or None)."""
    empty = tmp_path / 'no_checkpoint'
    (empty / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'not_an_image.png').write_text('hello')
    (tmp_path / 'truncated.safetensors').write_bytes(b'\x00' * 7)
    np.savez(tmp_path / 'other_model.npz', **{'encoder.weight': np.zeros((3, 3), np.float32)})
    from PIL import Image

    digit = str(tmp_path / 'digit.png')
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
    other = str(tmp_path / 'other_model.npz')
    return {
        'missing workdir': (['evaluate.py', '--workdir', str(tmp_path / 'nope')],
                            'does not exist', None),
        'no checkpoint': (['evaluate.py', '--workdir', str(empty)], 'No checkpoint in', None),
        'unknown model': (['evaluate.py', '--model', 'resnet5O', '--weights', other, '--dataset',
                           'mnist5k'], 'Did you mean: resnet50', None),
        'unreadable image': (['predict.py', '--workdir', str(empty),
                              str(tmp_path / 'not_an_image.png')], 'Cannot read image', None),
        'bad weights file': (['predict.py', '--model', 'lenet5', '--weights',
                              str(tmp_path / 'truncated.safetensors'), digit],
                             'Could not read weights file', None),
        'weights of another model': (['evaluate.py', '--model', 'lenet5', '--weights', other,
                                      '--dataset', 'mnist5k'], 'does not fit lenet5', None),
        'unknown step': (['evaluate.py', '--step', '7'], 'No checkpoint for step 7', 'digits_run'),
        'ema without ema': (['evaluate.py', '--ema'], 'has no EMA weights', 'folder_run'),
    }


ERROR_CASES = ['missing workdir', 'no checkpoint', 'unknown model', 'unreadable image',
               'bad weights file', 'weights of another model', 'unknown step', 'ema without ema']


@pytest.mark.parametrize('case', ERROR_CASES)
def test_user_errors_are_one_clear_line(request, tmp_path, case):
    args, message, run = _user_error_cases(tmp_path)[case]
    if run is not None:  # only these cases wait for a shared run
        args = [*args, '--workdir', request.getfixturevalue(run)]
    proc = run_tool(*args, check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'Traceback' not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    if case == 'missing workdir':
        verbose = run_tool(*args, '--verbose', check=False)
        assert verbose.returncode == 1 and 'Traceback' in verbose.stderr


# ------------------------------------------------------------------ evaluate


def test_evaluate_reproduces_the_runs_final_evaluation(digits_run):
    workdir = digits_run
    results_path = os.path.join(workdir, 'results.json')
    before = (open(results_path, 'rb').read(), os.stat(results_path).st_mtime_ns)
    results = _results(workdir)

    proc = run_tool('evaluate.py', '--workdir', workdir)
    assert 'top-1 0.' in proc.stdout and 'images/s' in proc.stdout, proc.stdout
    out = os.path.join(workdir, 'eval_test_60.json')
    assert out in proc.stdout
    with open(out) as f:
        record = json.load(f)
    assert record['step'] == 60 and record['num_examples'] == 1000
    assert record['top1'] == pytest.approx(results['top1'], abs=1e-6)
    assert record['top5'] == pytest.approx(results['top5'], abs=1e-6)
    assert record['loss'] == pytest.approx(results['loss'], abs=1e-6)
    assert record['images_per_sec'] > 0
    assert (open(results_path, 'rb').read(), os.stat(results_path).st_mtime_ns) == before
    with open(os.path.join(workdir, 'labels.json')) as f:
        assert json.load(f) == [str(d) for d in range(10)]  # mnist5k's tfds metadata names


def test_evaluate_ema_weights_of_an_earlier_step(digits_run):
    """`--ema --step 30`: the EMA weights of the step-30 checkpoint give the EMA evaluation
    the run logged at step 30 (metrics.jsonl, full precision)."""
    workdir = digits_run
    logged = next(r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
                  if r['split'] == 'test_ema' and r['step'] == 30)
    record = json.loads(run_tool('evaluate.py', '--workdir', workdir, '--ema', '--step', '30',
                                 '--json').stdout)
    assert record['ema'] and record['step'] == 30 and record['num_examples'] == 1000
    assert record['top1'] == pytest.approx(logged['top1'], abs=1e-6)
    assert record['loss'] == pytest.approx(logged['loss'], abs=1e-6)
    assert record['output'] == os.path.join(workdir, 'eval_test_ema_30.json')
    with open(record['output']) as f:
        assert json.load(f)['top1'] == record['top1']


def test_evaluate_compares_with_the_reference_implementation(shared_data_dir, tmp_path):
    """A timm resnet18 (random init, randomized BatchNorm statistics) saved as safetensors:
    both implementations see the same preprocessed digits and must agree."""
    timm = pytest.importorskip('timm')
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model('resnet18', num_classes=10)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    weights = str(tmp_path / 'resnet18_digits.safetensors')
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    record = json.loads(run_tool(
        'evaluate.py', '--model', 'resnet18', '--weights', weights, '--dataset', 'mnist5k',
        '--data-dir', shared_data_dir, '--split', 'test[:16]', '--image-size', '32',
        '--batch-size', '16', '--compare-reference', '--json').stdout)
    ref = record['reference']
    assert record['num_examples'] == ref['num_examples'] == 16
    assert ref['top1_agreement'] == 1.0
    assert ref['max_abs_logit_diff'] < 1e-4
    assert ref['reference_top1'] == pytest.approx(record['top1'])
    assert record['output'] == str(tmp_path / 'resnet18_digits.eval_mnist5k_test-16.json')


# ------------------------------------------------------------------ predict


def test_predict_on_files_and_on_the_split_agrees_with_evaluate(digits_run, shared_data_dir,
                                                                 tmp_path):
    from PIL import Image

    import input_pipeline

    workdir = digits_run
    split = json.loads(run_tool('predict.py', '--workdir', workdir, '--split', 'test',
                                '--json').stdout)
    assert split['num_images'] == 1000
    assert split['top1_accuracy'] == pytest.approx(_results(workdir)['top1'], abs=1e-6)
    assert split['class_names'] == os.path.join(workdir, 'labels.json')

    # Held-out digits written as PNG files go through the same eval transform (28x28
    # zero-padded to 32x32), so every file gets its split prediction.
    config = input_pipeline.default_data_config()
    config.data_dir = shared_data_dir
    source = input_pipeline.load_source(config, 'mnist5k', 'test')
    picks = [0, 123, 456, 789, 999]
    files = []
    for i in picks:
        files.append(str(tmp_path / f'digit_{i}.png'))
        Image.fromarray(source.data[i][..., 0]).save(files[-1])
    out = json.loads(run_tool('predict.py', '--workdir', workdir, '--top-k', '3', '--json',
                              *files).stdout)
    assert [p['image'] for p in out['predictions']] == files
    for i, pred in zip(picks, out['predictions'], strict=True):
        expected = split['predictions'][i]['top_k'][:3]
        assert [e['class'] for e in pred['top_k']] == [e['class'] for e in expected]
        assert [e['name'] for e in pred['top_k']] == [str(e['class']) for e in expected]
        np.testing.assert_allclose([e['probability'] for e in pred['top_k']],
                                   [e['probability'] for e in expected], atol=1e-6)


def test_folder_run_writes_labels_and_predict_names_them(folder_run, digit_folder):
    with open(os.path.join(folder_run, 'labels.json')) as f:
        assert json.load(f) == sorted(FOLDER_CLASSES)  # class folders, in label order

    files = [os.path.join(digit_folder, 'test', name, '0.png') for name in sorted(FOLDER_CLASSES)]
    proc = run_tool('predict.py', '--workdir', folder_run, '--top-k', '3', *files)
    lines = proc.stdout.splitlines()
    assert 'labels.json' in lines[0]
    for path in files:
        block = lines[lines.index(path) + 1:lines.index(path) + 4]
        # '  97.12%  zero': every class is named by its folder.
        assert sorted(line.split()[-1] for line in block) == sorted(FOLDER_CLASSES), proc.stdout
        assert all(line.strip().split()[0].endswith('%') for line in block)
