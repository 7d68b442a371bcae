"""tools/export.py as a user runs it: SavedModel, TFLite and ONNX, each against JAX's logits.

One model per kind of convolution the families use (plain, depthwise, grouped, GroupNorm
with weight standardisation), at 32 px with 10 classes so that conversion, not
arithmetic, is what is timed; a LeNet-5 trained for a few steps by train.py; the
tolerance and the refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, REPO, run_train

pytest.importorskip('tf2onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('ai_edge_litert')

TOOL = os.path.join(REPO, 'tools', 'export.py')


def run_export(args: list[str], *, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run([sys.executable, TOOL, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'export.py exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}')
    return proc


def manifest(out) -> dict:
    with open(os.path.join(out, 'export.json')) as f:
        return json.load(f)


def assert_checked(out, formats: tuple[str, ...], rtol: float = 1e-4) -> dict:
    info = manifest(out)
    checked = info['check']['formats']
    assert sorted(checked) == sorted(formats)
    for fmt in formats:
        assert checked[fmt]['relative_error'] <= rtol, (fmt, checked[fmt])
        assert checked[fmt]['max_abs_error'] <= rtol * 10, (fmt, checked[fmt])
    files = {'savedmodel': 'saved_model', 'tflite': 'model.tflite', 'onnx': 'model.onnx'}
    assert sorted(os.listdir(out)) == sorted(['export.json', *(files[f] for f in formats)])
    return info


@pytest.mark.parametrize('model', ['resnet18', 'mobilenetv2_100'])
def test_all_formats_match_jax(model, tmp_path):
    """Plain and depthwise convolutions: every format's logits within 1e-4 of JAX's.
    ResNet-18 starts from a timm weights file (BatchNorm statistics randomised), and its
    ONNX file, fed uint8 images, reproduces timm's logits on the normalised images."""
    out = tmp_path / 'export'
    source = ['--model', model, '--num-classes', '10']
    reference = None
    if model == 'resnet18':
        timm = pytest.importorskip('timm')
        torch = pytest.importorskip('torch')
        from parity import randomize_norms
        from safetensors.numpy import save_file

        reference = timm.create_model('resnet18', num_classes=10).eval()
        randomize_norms(reference)
        weights = str(tmp_path / 'resnet18.safetensors')
        save_file({k: np.ascontiguousarray(v.detach().numpy()) for k, v in reference.state_dict().items()}, weights)
        source = ['--model', model, '--weights', weights]
    # ResNet-18's TFLite and ONNX files take batches of 2 (checked on 3 images: one padded
    # batch), MobileNet's any batch size (--batch-size 0).
    batch = 2 if model == 'resnet18' else 0
    proc = run_export([*source, '--resolution', '32', '--check-images', '3', '--batch-size', str(batch),
                       '--output', str(out)])
    print(proc.stdout)
    info = assert_checked(out, ('savedmodel', 'tflite', 'onnx'))
    assert info['input'] == {
        'name': 'images', 'dtype': 'uint8', 'shape': [None, 32, 32, 3], 'layout': 'NHWC',
        'batch': {'savedmodel': None, 'tflite': batch or None, 'onnx': batch or None},
        'channels': 'RGB', 'value_range': [0, 255],
    }
    assert info['baked_in']['mean'] == pytest.approx([0.485, 0.456, 0.406])
    assert info['preprocessing_before_input']['resize_shorter_side_to'] == 36  # floor(32 / 0.875)
    for fmt in ('savedmodel', 'tflite', 'onnx'):
        assert f'{fmt} ' in proc.stdout and 'max |logit diff|' in proc.stdout

    # The files run as a user would run them, outside the tool: outputs by name, and the
    # probabilities are the softmax of the logits.
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [('images', [batch or 'batch', 32, 32, 3])]
    logits, probs = sess.run(['logits', 'probabilities'], {'images': x})
    lite = Interpreter(model_path=str(out / 'model.tflite')).get_signature_runner('serving_default')(images=x)
    np.testing.assert_allclose(lite['logits'], logits, atol=1e-4)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), atol=1e-6)
    if reference is not None:
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        normalised = ((x / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
        with torch.no_grad():
            expected = reference(torch.from_numpy(normalised)).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
    if model == 'mobilenetv2_100':
        # Depthwise convolutions are exported as the converters' depthwise op, not as the
        # shifted multiply-adds models/layers.py runs on CPU in training.
        ops = {d['op_name'] for d in Interpreter(model_path=str(out / 'model.tflite'))._get_ops_details()}
        assert 'DEPTHWISE_CONV_2D' in ops, sorted(ops)


@pytest.mark.parametrize('model,kwargs', [
    ('shufflenet_v1_g3', []),  # grouped 1x1 convolutions (3 groups) and depthwise 3x3
    ('resnet18', ['norm=group', 'weight_std=true']),  # GroupNorm + weight standardisation
])
def test_savedmodel_grouped_and_groupnorm(model, kwargs, tmp_path):
    out = tmp_path / 'export'
    args = ['--model', model, '--num-classes', '10', '--resolution', '32', '--formats', 'savedmodel',
            '--output', str(out)]
    proc = run_export(args + (['--model-kwargs', *kwargs] if kwargs else []))
    print(proc.stdout)
    info = assert_checked(out, ('savedmodel',))
    if kwargs:
        assert info['model_kwargs'] == {'norm': 'group', 'weight_std': True}


def test_trained_workdir_and_tolerance(data_dir, tmp_path):
    """A LeNet-5 trained by train.py: the run's model, resolution (32 px, one channel) and
    eval transform are taken from the workdir; an existing export is refused without
    --overwrite; an export beyond --rtol fails with status 2 and changes nothing."""
    workdir = str(tmp_path / 'run')
    run_train(['--config', 'configs/default.py', '--workdir', workdir,
               f'--config.data.data_dir={data_dir}', '--config.num_train_steps=4',
               '--config.batch_size=16', '--config.eval_batch_size=500', '--config.log_every_steps=2',
               '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4',
               '--config.schedule.warmup_steps=1'])
    out = str(tmp_path / 'lenet_export')
    proc = run_export(['--workdir', workdir, '--output', out])
    print(proc.stdout)
    info = assert_checked(out, ('savedmodel', 'tflite', 'onnx'))
    assert info['model'] == 'lenet5' and info['num_classes'] == 10
    assert info['source'].endswith('step 4')
    assert info['input']['shape'] == [None, 32, 32, 1]
    assert info['input']['batch'] == {'savedmodel': None, 'tflite': 1, 'onnx': 1}
    assert info['preprocessing_before_input']['eval_transform'] == 'small'

    refused = run_export(['--workdir', workdir, '--formats', 'savedmodel', '--output', out], check=False)
    assert refused.returncode == 1 and 'not empty' in refused.stderr and '--overwrite' in refused.stderr
    assert 'Traceback' not in refused.stderr

    # Float input, beyond an impossible tolerance: exit status 2, and the export already
    # at --output is left as it was (no partial directory either).
    before = manifest(out)
    failed = run_export(['--workdir', workdir, '--formats', 'tflite', '--input-dtype', 'float32',
                         '--rtol', '1e-12', '--overwrite', '--output', out], check=False)
    assert failed.returncode == 2, failed.stderr
    assert 'FAILED (> --rtol 1e-12)' in failed.stdout and 'beyond --rtol' in failed.stderr
    assert 'Traceback' not in failed.stderr
    rel = float(failed.stdout.split('relative ')[1].split()[0])
    assert 1e-12 < rel < 1e-4  # a real, small difference: the float32 path itself works
    assert manifest(out) == before
    assert sorted(p for p in os.listdir(tmp_path) if 'lenet_export' in p) == ['lenet_export']


@pytest.mark.parametrize('args,message', [
    (['--model', 'resnet_18'], 'resnet18'),  # unknown model: the close name
    (['--workdir', '/nonexistent/run'], 'does not exist'),
    (['--model', 'lenet5', '--formats', 'tflite,pb'], 'choose from savedmodel,tflite,onnx'),
    (['--model', 'lenet5', '--model-kwargs', 'depth'], 'KEY=VALUE'),
    (['--model', 'lenet5', '--platforms', 'cuda'], 'include cpu'),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    proc = run_export([*args, '--output', str(tmp_path / 'out')], check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / 'out')


def test_output_replaced_only_when_finished(tmp_path):
    """--overwrite replaces a previous export (never another directory) by renaming the
    finished one into place."""
    sys.path.insert(0, REPO)
    from tools import export

    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(export.ExportError, match='not empty'):
        export.check_output_dir(str(out), overwrite=False)
    with pytest.raises(export.ExportError, match='not a previous export'):
        export.check_output_dir(str(out), overwrite=True)
    (out / 'notes.txt').unlink()
    (out / 'export.json').write_text('{"old": true}')
    export.check_output_dir(str(out), overwrite=True)
    staging = tmp_path / '.out.partial-x'
    staging.mkdir()
    (staging / 'export.json').write_text('{"new": true}')
    export.publish(str(staging), str(out))
    assert json.loads((out / 'export.json').read_text()) == {'new': True}
    assert sorted(os.listdir(tmp_path)) == ['out']
