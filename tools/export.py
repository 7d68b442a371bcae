"""Export a model for serving: TF SavedModel, TFLite and ONNX, each checked against JAX.

    python tools/export.py --workdir /tmp/flaxnets/default --output /tmp/flaxnets/default_export
    python tools/export.py --model resnet50 --weights resnet50.safetensors --output /tmp/r50
    python tools/export.py --model mobilenetv2_100 --resolution 96 --output /tmp/mnv2   # random init

Sources: a training workdir (its newest checkpoint, or `--step N`; `--ema` takes the EMA
weights; the model, its overrides and the resolution come from the run's `config.json` and
checkpoint), a reference weights file in timm / torchvision naming (`--model NAME --weights
FILE`: whatever `trainers/finetune.py` reads, converted strictly by
`models.convert_state_dict`), or `--model NAME` alone with random weights, for trying it.

The exported function takes a batch of images at the model's resolution, NHWC, RGB (or
gray for one-channel models) as `images`: uint8 in [0, 255] (default) or, with
`--input-dtype float32`, float32 pixel values in the same [0, 255] range. Baked in is the
normalisation of the model's eval preprocessing (`input_pipeline.preprocess.normalize`):
`(x / 255 - mean) / std` with the model's per-channel mean and std. Not baked in, because
it depends on the source image's size: bringing an image to the resolution. The eval
transform the model was evaluated with (for ImageNet-style models: resize the shorter side
to floor(size / crop_pct) with the model's interpolation, centre crop; for the small-image
datasets: zero-pad or resize) is written to `export.json`. Outputs: `logits` and
`probabilities` (softmax), float32 (batch, num_classes). Computation is float32, whatever
compute dtype the run trained with.

The output directory receives `saved_model/` (signature `serving_default`, any batch
size), `model.tflite` (signature `serving_default`) and `model.onnx` (inputs and outputs
named as above), both with the batch size fixed by `--batch-size` (default 1; 0 keeps it
open, named `batch` in ONNX), and `export.json` (source, input, baked-in and remaining
preprocessing, outputs, per-format errors, library versions). A fixed batch matters for
TFLite: with an open one, BatchNorm's per-channel constants are broadcast at run time to
the batch's shape and cannot be folded into the convolutions (MobileNet v2: 430 TFLite
ops instead of 75). Everything is written into a
temporary directory beside `--output` and renamed into place only after every format has
passed its check, so an interrupted or failed export never leaves a complete-looking
directory behind. An existing non-empty `--output` is refused unless `--overwrite` (and
even then only when it holds a previous export, i.e. has an `export.json`).

Each format is checked by running it (TensorFlow for the SavedModel, the LiteRT
interpreter for TFLite, onnxruntime for ONNX) on random images and comparing the logits
with the JAX model's on the same images: the largest absolute difference and the relative
one, |difference| / max(1, largest |logit|), are printed per format, and a relative error
above `--rtol` fails the command (exit status 2, nothing written). User errors print one
line and exit with status 1; `--verbose` shows the traceback and the converters' logs.

Route, for the libraries installed (JAX 0.10, TensorFlow 2.21, tf2onnx 1.17):
- SavedModel: `jax.experimental.jax2tf.convert` with native serialization. It is the
  maintained JAX -> TensorFlow bridge (only its old non-native graph mode was removed):
  the function is exported with `jax.export` to StableHLO and wrapped in one TensorFlow
  `XlaCallModule` op, so TensorFlow runs exactly the computation JAX compiles, including
  whatever a layer lowers to on the target (e.g. `jax.lax.platform_dependent` branches are
  resolved per platform; `--platforms` lists the ones to lower for). Parameters become
  `tf.Variable`s of the SavedModel, not constants in the graph. `orbax-export` is a
  wrapper around the same jax2tf call with serving-signature plumbing that this tool does
  in a few lines, so it is not a dependency.
- TFLite: `tf.lite.TFLiteConverter.from_saved_model`, which legalises the StableHLO inside
  `XlaCallModule` to TFLite builtin ops; run with `ai_edge_litert` (TensorFlow's own
  `tf.lite.Interpreter` is deprecated in its favour).
- ONNX: tf2onnx's TensorFlow front end cannot read `XlaCallModule` (it maps TF graph ops
  only), and jax2onnx 0.17 requires orbax-checkpoint < 0.11.37 where we need 0.12. tf2onnx's
  TFLite front end (`tf2onnx.convert.from_tflite`) reads the TFLite file, whose builtins it
  maps to ONNX; the graph's inputs and outputs are then renamed to the signature's names.
  onnxruntime runs the check. Limitation: where TFLite has no builtin of the same meaning,
  its converter keeps a StableHLO op (`STABLEHLO_REDUCE_WINDOW` for an average pool whose
  divisor counts zero padding, torch's count_include_pad=True, and for any average pool
  when the batch size is open), and tf2onnx 1.17 cannot read those; the ONNX export of
  such a model stops with a message naming the op.
- Convolutions are traced as XLA's own (models/layers.py `native_convolutions()`), so
  TFLite and ONNX get their conv and depthwise conv ops rather than the im2col products
  and shifted multiply-adds the layers run on CPU for training.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# TensorFlow prints a dozen start-up lines to stderr otherwise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from flaxnets_errors import UserError  # noqa: E402
from tools import inference  # noqa: E402  (stdlib-only at import: user errors stay fast)

FORMATS = ('savedmodel', 'tflite', 'onnx')
FILES = {'savedmodel': 'saved_model', 'tflite': 'model.tflite', 'onnx': 'model.onnx'}
SIGNATURE = 'serving_default'
ONNX_OPSET = 17  # run by onnxruntime >= 1.14; tf2onnx 1.17 emits it from TFLite files
# TFLite flatbuffers and ONNX protobufs cannot hold more than 2 GiB.
PROTO_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2
# Exit statuses.
USER_ERROR, CHECK_FAILED = 1, 2


class ExportError(inference.ToolError):
    """A problem the user can fix: printed as one line, exit status 1."""


def is_user_error(e: Exception) -> bool:
    """The project's user errors (flaxnets_errors.UserError) and the ones tools/inference.py
    recognises by name."""
    return isinstance(e, UserError) or inference.user_error_message(e) is not None


@dataclasses.dataclass
class Source:
    """A model with its weights and what the export needs to know about it."""

    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    variables: dict
    resolution: int
    channels: int
    description: str
    preprocessing: dict[str, Any]


# ----------------------------------------------------------------------------- sources


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """`['norm=group', 'weight_std=true']` -> overrides; values are Python literals
    (`true`/`false`/`none` also accepted), anything else stays a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ExportError(f'--model-kwargs takes KEY=VALUE items, got {item!r}')
        lowered = {'true': True, 'false': False, 'none': None}
        if value.lower() in lowered:
            out[key] = lowered[value.lower()]
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def eval_preprocessing(model_name: str, resolution: int, data: dict | None = None) -> dict[str, Any]:
    """What a caller does to an image before the exported function (not baked in).

    Follows input_pipeline/preprocess.py's eval transform, with the run's data settings
    when there is a run, else the model's ImageNet defaults."""
    import models

    cfg = models.get_model_cfg(model_name)
    data = data or {}
    kind = data.get('preprocess', 'imagenet')
    interpolation = data.get('interpolation') or cfg.interpolation
    out: dict[str, Any] = {'eval_transform': kind, 'interpolation': interpolation}
    if data.get('source_size'):
        out['first_resize_to'] = int(data['source_size'])
    if kind == 'imagenet':
        crop_pct = float(data.get('crop_pct') or cfg.crop_pct)
        out.update(
            crop_pct=crop_pct,
            resize_shorter_side_to=math.floor(resolution / crop_pct),
            centre_crop=resolution,
            description=(
                f'resize the shorter side to {math.floor(resolution / crop_pct)} px '
                f'({interpolation}), then centre-crop {resolution}x{resolution}'
            ),
        )
    else:
        out['description'] = (
            f'bring the image to {resolution}x{resolution}: unchanged at that size, '
            f'zero-padded symmetrically when smaller by an even number of pixels, '
            f'else resized ({interpolation})'
        )
    return out


def from_run_or_file(args: argparse.Namespace, kwargs: dict) -> Source:
    """A run's checkpoint (`--workdir`) or a weights file (`--model --weights`), read by
    tools/inference.py, the loader tools/evaluate.py and tools/predict.py use."""
    import models

    ns = argparse.Namespace(
        workdir=args.workdir, step=args.step, ema=args.ema, model=args.model, weights=args.weights,
        num_classes=args.num_classes, set=[f'{k}={v!r}' for k, v in kwargs.items()],
        image_size=args.resolution, batch_size=0,
    )
    inference.check_source_args(ns)
    loaded = inference.load_source(ns)
    cfg = models.get_model_cfg(loaded.model_name)
    run = loaded.run_config or {}
    resolution = args.resolution or int(run.get('image_size') or 0) or cfg.input_size[0]
    variables = {k: v for k, v in loaded.variables.items() if v or k == 'params'}
    return Source(
        model_name=loaded.model_name, model_kwargs=loaded.overrides, num_classes=loaded.num_classes,
        variables=variables, resolution=resolution, channels=cfg.input_size[2],
        description=loaded.description,
        preprocessing=eval_preprocessing(loaded.model_name, resolution, run.get('data')),
    )


def random_init(model_name: str, num_classes: int | None, kwargs: dict, resolution: int,
                seed: int) -> Source:
    """A randomly initialised model (for trying the export)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import models

    cfg = models.get_model_cfg(model_name)
    num_classes = num_classes or cfg.num_classes
    resolution = resolution or cfg.input_size[0]
    channels = cfg.input_size[2]
    model = models.create_model(model_name, num_classes=num_classes, **kwargs)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, resolution, resolution, channels)), train=False))
    variables = jax.tree.map(np.asarray, dict(init(jax.random.key(seed))))
    return Source(
        model_name=model_name, model_kwargs=kwargs, num_classes=num_classes, variables=variables,
        resolution=resolution, channels=channels, description=f'random init (seed {seed})',
        preprocessing=eval_preprocessing(model_name, resolution),
    )


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def quiet_native(enabled: bool) -> Iterator[list[str]]:
    """Sends file descriptor 2 to a temporary file (the converters' C++ logging ignores
    TF_CPP_MIN_LOG_LEVEL); the captured text is yielded in a list after the block."""
    captured: list[str] = []
    if not enabled:
        yield captured
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors='replace'))


def make_predict(source: Source) -> Callable:
    """`predict(variables, images) -> (probabilities, logits)` with normalisation baked in."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import models

    cfg = models.get_model_cfg(source.model_name)
    model = models.create_model(source.model_name, num_classes=source.num_classes,
                                dtype=jnp.float32, **source.model_kwargs)
    mean = np.broadcast_to(np.asarray(cfg.mean, np.float32), (source.channels,))
    std = np.broadcast_to(np.asarray(cfg.std, np.float32), (source.channels,))

    def predict(variables, images):
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        logits = model.apply(variables, x, train=False).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1), logits

    return predict


def save_savedmodel(predict: Callable, source: Source, input_dtype: str, platforms: tuple[str, ...],
                    path: str, batch: int = 0) -> None:
    """jax2tf (native serialization) -> tf.saved_model with a `serving_default` signature,
    for a fixed `batch` size or (0) any.

    Depthwise convolutions are traced as the native grouped convolution on every platform
    (models/layers.py would pick shifted multiply-adds on CPU, which it does for the
    training step's backward pass): TFLite and ONNX then get their depthwise conv op
    instead of one multiply-add per kernel tap."""
    import numpy as np
    import tensorflow as tf
    from jax.experimental import jax2tf

    from models import layers

    r, c = source.resolution, source.channels
    converted = jax2tf.convert(
        predict,
        polymorphic_shapes=None if batch else [None, f'(batch, {r}, {r}, {c})'],
        with_gradient=False,
        native_serialization_platforms=platforms,
    )
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(
        lambda a: tf.Variable(np.asarray(a), trainable=False), source.variables
    )
    spec = tf.TensorSpec([batch or None, r, r, c], tf.as_dtype(input_dtype), name='images')

    @tf.function(autograph=False, input_signature=[spec])
    def serve(images):
        probabilities, logits = converted(module.variables_tree, images)
        return {'logits': tf.identity(logits, name='logits'),
                'probabilities': tf.identity(probabilities, name='probabilities')}

    module.serve = serve
    # Read when the JAX function is traced, which tf.saved_model.save does (again).
    with layers.native_convolutions():
        tf.saved_model.save(module, path, signatures={SIGNATURE: serve})


def convert_tflite(saved_model: str, path: str) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE])
    with open(path, 'wb') as f:
        f.write(converter.convert())


def _tflite_signature_tensors(tflite_path: str) -> tuple[dict[str, str], dict[str, str]]:
    """({input name: tensor name}, {output name: tensor name}) of the TFLite signature."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=tflite_path)
    runner = interp.get_signature_runner(SIGNATURE)
    ins = {k: v['name'] for k, v in runner.get_input_details().items()}
    outs = {k: v['name'] for k, v in runner.get_output_details().items()}
    return ins, outs


class UnsupportedOp(Exception):
    """The model lowers to an op a converter cannot take; the message says which and why."""


# Why the TFLite converter keeps a StableHLO op rather than a TFLite builtin, for the ops
# our models produce (each has no builtin of the same meaning).
STABLEHLO_CAUSES = {
    'STABLEHLO_REDUCE_WINDOW': 'an average pool it cannot map to AVERAGE_POOL_2D: one whose divisor '
                               'counts zero padding (torch count_include_pad=True), or any average '
                               'pool when the batch size is left open (--batch-size 0)',
    'STABLEHLO_SCATTER': 'an indexed update (x.at[...].set) on the weights',
}


def unsupported_tflite_op(code: int, batch: int) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    name = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}.get(code, str(code))
    cause = STABLEHLO_CAUSES.get(name, 'an operation TFLite has no builtin for')
    return (f'tf2onnx cannot read the TFLite op {name}, which the TFLite converter keeps for {cause}; '
            + ('a fixed --batch-size may avoid it, else ' if not batch else '')
            + 'export --formats savedmodel,tflite for this model')


def convert_onnx(tflite_path: str, path: str, batch: int) -> None:
    """tf2onnx's TFLite front end, then the signature's names on the graph's inputs/outputs."""
    import onnx
    import tf2onnx

    ins, outs = _tflite_signature_tensors(tflite_path)
    try:
        model, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
    except ValueError as e:
        unknown = re.search(r'lookup value (\d+) for tflite enum BuiltinOperator', str(e))
        if not unknown:
            raise
        raise UnsupportedOp(unsupported_tflite_op(int(unknown.group(1)), batch)) from e
    rename = {v: k for k, v in {**ins, **outs}.items()}
    graph = model.graph
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for value in [*graph.input, *graph.output]:
        value.name = rename.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField('dim_value'):
            dims[0].dim_param = 'batch'
    names = sorted(v.name for v in graph.output)
    if names != sorted(outs):
        raise RuntimeError(f'ONNX outputs {names} do not match the signature outputs {sorted(outs)}')
    onnx.checker.check_model(model)
    onnx.save(model, path)


# ----------------------------------------------------------------------------- checks


def run_savedmodel(path: str, images) -> Any:
    import tensorflow as tf

    fn = tf.saved_model.load(path).signatures[SIGNATURE]
    return fn(images=tf.constant(images))['logits'].numpy()


def run_tflite(path: str, images) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner(SIGNATURE)
    return runner(images=images)['logits']


def run_onnx(path: str, images) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return session.run(['logits'], {'images': images})[0]


RUNNERS = {'savedmodel': run_savedmodel, 'tflite': run_tflite, 'onnx': run_onnx}


def run_in_batches(fmt: str, path: str, images, batch: int):
    """Logits of `images` from the exported file, `batch` at a time (0: all at once); a
    short last batch is padded with zeros and the padding dropped."""
    import numpy as np

    if not batch:
        return RUNNERS[fmt](path, images)
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)
        out.append(np.asarray(RUNNERS[fmt](path, np.concatenate([chunk, pad])))[: len(chunk)])
    return np.concatenate(out)


def check_images(source: Source, input_dtype: str, count: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (count, source.resolution, source.resolution, source.channels)
    if input_dtype == 'uint8':
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.uniform(0.0, 255.0, shape).astype(np.float32)


def compare(got, expected) -> tuple[float, float]:
    """(max |difference|, max |difference| / max(1, max |expected|))."""
    import numpy as np

    if got.shape != expected.shape:
        raise RuntimeError(f'logits of shape {got.shape}, expected {expected.shape}')
    err = float(np.max(np.abs(got.astype(np.float64) - expected)))
    return err, err / max(1.0, float(np.max(np.abs(expected))))


# ----------------------------------------------------------------------------- output


def check_dependencies(formats: list[str]) -> None:
    """Fails early, naming the install command, when a converter or runtime is missing."""
    import importlib.util

    needed = {'savedmodel': ['tensorflow'], 'tflite': ['tensorflow', 'ai_edge_litert'],
              'onnx': ['tensorflow', 'ai_edge_litert', 'tf2onnx', 'onnx', 'onnxruntime']}
    missing = sorted({m for f in formats for m in needed[f] if importlib.util.find_spec(m) is None})
    if missing:
        raise ExportError(f'{", ".join(missing)} not installed; the export needs the [export] extra: '
                          f'pip install -e ".[export]"')


def check_output_dir(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f'--output {output} exists and is not a directory')
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise ExportError(f'--output {output} exists and is not empty; give --overwrite to replace it '
                              f'or choose another directory')
        if not os.path.isfile(os.path.join(output, 'export.json')):
            raise ExportError(f'--output {output} is not empty and holds no export.json, so it is not a '
                              f'previous export; --overwrite replaces only exports. Choose another directory')


def publish(staging: str, output: str) -> None:
    """Moves the finished export into place; the old one (if any) goes only after."""
    parent = os.path.dirname(output)
    old = None
    if os.path.isdir(output):
        if os.listdir(output):
            old = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.old-', dir=parent)
            os.rmdir(old)
            os.rename(output, old)
        else:
            os.rmdir(output)
    os.rename(staging, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ('jax', 'jaxlib', 'flax', 'tensorflow-cpu', 'tensorflow', 'ai-edge-litert', 'tf2onnx',
                 'onnx', 'onnxruntime'):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='See the module docstring (tools/export.py) for the exported signature and the route.',
    )
    src = parser.add_argument_group('source (one of --workdir or --model)')
    src.add_argument('--workdir', help='training workdir (or its checkpoints/ or a step folder)')
    src.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
    src.add_argument('--ema', action='store_true', help="export the run's EMA weights")
    src.add_argument('--model', help='registered model name (random weights unless --weights)')
    src.add_argument('--weights', help='reference weights file: .safetensors / .npz / .pth|.pt|.bin')
    src.add_argument('--num-classes', type=int, default=None,
                     help="head size for --model (default: the file's head or the model's default)")
    src.add_argument('--model-kwargs', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                     help='model overrides, e.g. --model-kwargs norm=group weight_std=true '
                          "(with --workdir: applied on top of the run's)")
    src.add_argument('--seed', type=int, default=0, help='random init and check images seed')
    parser.add_argument('--output', required=True, help='directory to write the export to')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing export at --output')
    parser.add_argument('--formats', default=','.join(FORMATS), help=f'comma-separated subset of {",".join(FORMATS)}')
    parser.add_argument('--resolution', type=int, default=0,
                        help="input height and width (default: the run's image_size or the model's)")
    parser.add_argument('--batch-size', type=int, default=1,
                        help='batch size fixed in the TFLite and ONNX files (0: any; the SavedModel takes '
                             'any batch). A fixed batch lets the converter fold BatchNorm into the '
                             'convolutions')
    parser.add_argument('--input-dtype', choices=('uint8', 'float32'), default='uint8',
                        help='dtype of the images input; both carry [0, 255] pixel values')
    parser.add_argument('--platforms', default='cpu',
                        help='platforms the SavedModel is lowered for, e.g. cpu,cuda,tpu (must include cpu, '
                             'where it is checked)')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='largest accepted |logit difference| / max(1, largest |logit|) per format')
    parser.add_argument('--check-images', type=int, default=4, help='random images in the check batch')
    parser.add_argument('--verbose', action='store_true', help='tracebacks and converter logs')
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks of the flags, before any library is loaded; normalises some in place."""
    if bool(args.workdir) == bool(args.model):
        raise ExportError('give either --workdir W (a train.py run) or --model NAME '
                          '[--weights FILE] (random weights without --weights)')
    if args.workdir and (args.weights or args.num_classes):
        raise ExportError('--weights and --num-classes go with --model; a --workdir names its own model')
    if args.workdir and not os.path.exists(args.workdir):
        raise ExportError(f'--workdir {args.workdir} does not exist; pass the workdir of a train.py run')
    if args.weights and not os.path.exists(args.weights):
        raise ExportError(f'--weights {args.weights} does not exist')
    if args.model and not args.weights and (args.step is not None or args.ema):
        raise ExportError('--step and --ema select a checkpoint of a run; give the run as --workdir')
    formats = [f.strip().lower() for f in args.formats.split(',') if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f'--formats {args.formats}: choose from {",".join(FORMATS)}')
    args.formats = [f for f in FORMATS if f in formats]
    args.platforms = tuple(p.strip().lower() for p in args.platforms.split(',') if p.strip())
    if 'cpu' not in args.platforms:
        raise ExportError(f'--platforms {",".join(args.platforms)}: include cpu, where the export is checked')
    if args.check_images < 1 or args.rtol <= 0 or args.resolution < 0 or args.batch_size < 0:
        raise ExportError('--check-images and --rtol must be positive, --resolution and --batch-size >= 0')
    args.output = os.path.abspath(args.output)
    args.overrides = parse_model_kwargs(args.model_kwargs)


def load_source(args: argparse.Namespace) -> Source:
    import models

    kwargs = args.overrides
    if args.model:
        models.get_model_cfg(args.model)  # UnknownModelError names the close matches
    try:
        if args.workdir or args.weights:
            return from_run_or_file(args, kwargs)
        return random_init(args.model, args.num_classes, kwargs, args.resolution, args.seed)
    except (TypeError, ValueError) as e:
        if kwargs and not is_user_error(e):  # most likely an override the model rejects
            raise ExportError(f'--model-kwargs {" ".join(args.model_kwargs)}: {e}') from e
        raise


def export(args: argparse.Namespace, staging: str) -> tuple[Source, dict[str, dict], bool]:
    """Writes the requested formats into `staging`; returns (source, check results, all ok)."""
    import jax
    import numpy as np

    import models

    t0 = time.time()
    source = load_source(args)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(source.variables))
    if nbytes > PROTO_LIMIT_BYTES and {'tflite', 'onnx'} & set(args.formats):
        raise ExportError(f'{source.model_name} has {nbytes / 2**30:.1f} GiB of weights; TFLite and ONNX files '
                          f'hold at most 2 GiB. Export --formats savedmodel')
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(source.variables['params']))
    r, c = source.resolution, source.channels
    print(f'{source.model_name} {source.model_kwargs or ""}'.rstrip()
          + f' from {source.description}: {n_params:,} parameters, {source.num_classes} classes, '
          f'input {args.input_dtype} (batch, {r}, {r}, {c})', flush=True)

    predict = make_predict(source)
    images = check_images(source, args.input_dtype, args.check_images, args.seed)
    with jax.default_device(jax.devices('cpu')[0]):
        expected = np.asarray(jax.jit(predict)(source.variables, images)[1], np.float64)

    # What is built, in order: (name, build, file, batch of the file, checked as).
    scratch = os.path.join(staging, '.scratch')
    os.makedirs(scratch)
    want = set(args.formats)
    saved_model = os.path.join(staging if 'savedmodel' in want else scratch, FILES['savedmodel'])
    # TFLite (and ONNX, converted from it) come from a SavedModel lowered for the CPU with
    # the batch fixed: a dynamic batch keeps BatchNorm as runtime broadcasts instead of
    # folding it into the convolutions (MobileNet v2: 430 TFLite ops instead of 75).
    b = args.batch_size
    reuse = 'savedmodel' in want and not b and args.platforms == ('cpu',)
    lite_source = saved_model if reuse else os.path.join(scratch, 'saved_model_for_tflite')
    tflite = os.path.join(staging if 'tflite' in want else scratch, FILES['tflite'])
    onnx_path = os.path.join(staging, FILES['onnx'])
    plan: list[tuple[str, Callable[[], None], str, int]] = []
    if 'savedmodel' in want:
        plan.append(('savedmodel', lambda: save_savedmodel(
            predict, source, args.input_dtype, args.platforms, saved_model), saved_model, 0))
    if want & {'tflite', 'onnx'}:
        if not reuse:
            plan.append(('', lambda: save_savedmodel(
                predict, source, args.input_dtype, ('cpu',), lite_source, b), lite_source, b))
        plan.append(('tflite', lambda: convert_tflite(lite_source, tflite), tflite, b))
    if 'onnx' in want:
        plan.append(('onnx', lambda: convert_onnx(tflite, onnx_path, b), onnx_path, b))

    quiet = not args.verbose
    results: dict[str, dict] = {}
    ok = True
    for fmt, build, path, batch in plan:
        t = time.time()
        with quiet_native(quiet) as log:
            try:
                build()
            except Exception as e:
                raise ConversionFailed(fmt or 'savedmodel', e, log) from e
        took = time.time() - t
        if fmt not in want:
            continue
        with quiet_native(quiet) as log:
            try:
                got = run_in_batches(fmt, path, images, batch)
            except Exception as e:
                raise ConversionFailed(fmt, e, log, running=True) from e
        err, rel = compare(np.asarray(got), expected)
        passed = rel <= args.rtol
        ok &= passed
        results[fmt] = {'file': FILES[fmt], 'batch': batch or None, 'max_abs_error': err,
                        'relative_error': rel, 'rtol': args.rtol, 'passed': passed,
                        'convert_seconds': round(took, 1)}
        print(f'  {fmt:<10} {FILES[fmt]:<13} batch {batch or "any":<4} max |logit diff| {err:.2e}  '
              f'relative {rel:.2e}  {"ok" if passed else f"FAILED (> --rtol {args.rtol:g})"}  '
              f'({took:.1f} s)', flush=True)
    shutil.rmtree(scratch)

    cfg = models.get_model_cfg(source.model_name)
    manifest = {
        'model': source.model_name,
        'model_kwargs': source.model_kwargs,
        'num_classes': source.num_classes,
        'source': source.description,
        'parameters': n_params,
        'input': {
            'name': 'images', 'dtype': args.input_dtype, 'shape': [None, r, r, c], 'layout': 'NHWC',
            'batch': {f: results[f]['batch'] for f in results},
            'channels': 'RGB' if c == 3 else ('gray' if c == 1 else f'{c} channels'),
            'value_range': [0, 255],
        },
        'baked_in': {
            'normalisation': '(x / 255 - mean) / std per channel',
            'mean': [float(v) for v in np.broadcast_to(cfg.mean, (c,))],
            'std': [float(v) for v in np.broadcast_to(cfg.std, (c,))],
        },
        'preprocessing_before_input': source.preprocessing,
        'outputs': {
            'logits': {'dtype': 'float32', 'shape': [None, source.num_classes]},
            'probabilities': {'dtype': 'float32', 'shape': [None, source.num_classes],
                              'of': 'softmax(logits)'},
        },
        'signature': SIGNATURE,
        'savedmodel_platforms': list(args.platforms),
        'onnx_opset': ONNX_OPSET if 'onnx' in args.formats else None,
        'check': {'images': args.check_images, 'seed': args.seed, 'formats': results},
        'versions': versions(),
        'seconds': round(time.time() - t0, 1),
    }
    with open(os.path.join(staging, 'export.json'), 'w') as f:
        json.dump(manifest, f, indent=2)
    return source, results, ok


class ConversionFailed(Exception):
    """A converter or runtime failed on this model (not a user error): exit status 1 with
    the converter's own message; the captured logs show with --verbose."""

    def __init__(self, fmt: str, error: Exception, log: list[str], running: bool = False):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        verb = 'running' if running else 'converting to'
        why = first if isinstance(error, UnsupportedOp) else f'{type(error).__name__}: {first}'
        super().__init__(f'{verb} {fmt} failed: {why}')
        self.log = ''.join(log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    staging = None
    # SIGTERM unwinds like Ctrl-C, so the temporary directory is removed on the way out.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        validate_args(args)
        check_output_dir(args.output, args.overwrite)
        check_dependencies(args.formats)
        if not args.verbose:
            import logging
            import warnings

            warnings.filterwarnings('ignore')
            for name in ('absl', 'tf2onnx', 'tensorflow'):
                logging.getLogger(name).setLevel(logging.ERROR)
        parent = os.path.dirname(args.output)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(args.output)}.partial-', dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        _, _, ok = export(args, staging)
        if not ok:
            print(f'error: an exported format differs from the JAX model beyond --rtol {args.rtol:g} '
                  f'(see above); nothing was written to {args.output}', file=sys.stderr)
            return CHECK_FAILED
        publish(staging, args.output)
        staging = None
        print(f'wrote {args.output} (export.json: inputs, outputs, preprocessing, errors)')
        return 0
    except ConversionFailed as e:
        if args.verbose:
            print(e.log, file=sys.stderr)
            traceback.print_exc()
        print(f'error: {e} (--verbose shows the converter log and traceback); nothing was written '
              f'to {args.output}', file=sys.stderr)
        return USER_ERROR
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: the traceback is the report
        if args.verbose:
            traceback.print_exc()
        print(f'error: {inference.user_error_message(e) or e}', file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f'interrupted; nothing was written to {args.output}', file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == '__main__':
    sys.exit(main())
