"""What `tools/evaluate.py` and `tools/predict.py` share: where the weights come from,
the model they fit, the eval-mode data settings and the class names.

A source is either a run (`--workdir W [--step N] [--ema]`: the newest or a given
checkpoint of a train.py workdir, with the run's `config.json` supplying the defaults) or
`--model NAME --weights PATH`, where PATH is anything `config.init_from` reads: a flaxnets
workdir, its `checkpoints/` folder or one step folder, or a reference weights file
(`.safetensors`, `.npz`, `.pth`/`.pt`/`.bin`) converted strictly by the family's name map.
A checkpoint directory inside a workdir takes that workdir's `config.json` defaults too.
An MPL workdir gives its student (the fine-tuned one when the run fine-tuned it).

Every mistake a user can make (a missing workdir, no checkpoint yet, an unknown step or
model, weights that do not fit, an unknown dataset or split) ends as a `ToolError` or
another `flaxnets_errors.UserError` whose message names the cause and the fix; `run_cli`
prints it as one `error:` line and exits with status 1 (`--verbose` adds the traceback).
Heavy libraries are imported inside the functions, after the cheap checks, so that a
mistyped path fails in a second rather than after TensorFlow has loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# TensorFlow (tf.data only) prints a dozen start-up lines to stderr otherwise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from flaxnets_errors import UserError  # noqa: E402  (stdlib only)

WEIGHT_SUFFIXES = ('.safetensors', '.npz', '.pth', '.pt', '.bin')
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
# Preferred evaluation splits when neither --split nor a run's config names one.
DEFAULT_SPLITS = ('validation', 'val', 'test')


class ToolError(UserError):
    """A user mistake; the message is one line naming the cause and the fix."""


# ----------------------------------------------------------------------------- CLI


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """The flags both tools take to choose the weights, the data and the batch."""
    src = parser.add_argument_group('weights (a run, or a model and a weights file)')
    src.add_argument('--workdir', help='train.py workdir; its config.json supplies the defaults')
    src.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
    src.add_argument('--ema', action='store_true', help="the checkpoint's EMA weights")
    src.add_argument('--model', help='registered model name (with --weights)')
    src.add_argument('--weights', help='weights file (.safetensors/.npz/.pth) or flaxnets '
                     'checkpoint directory, as config.init_from reads')
    src.add_argument('--num-classes', type=int, default=None,
                     help="--weights file's class count (default: read from its classifier)")
    src.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                     help='model override for --model, e.g. --set norm=group (repeatable)')
    data = parser.add_argument_group('data (defaults: the run config, else the model default)')
    data.add_argument('--dataset', help="tfds name or 'folder:/path/to/root'")
    data.add_argument('--split', help="split name, tfds slicing allowed ('test[:500]')")
    data.add_argument('--data-dir', help='tfds data dir (default: the run config, else tfds)')
    data.add_argument('--image-size', type=int, default=0, help='input resolution')
    data.add_argument('--batch-size', type=int, default=0, help='global batch size')
    parser.add_argument('--verbose', action='store_true', help='show tracebacks of errors')


def run_cli(fn: Callable[[], int], verbose: bool) -> int:
    """Runs `fn`, turning user mistakes into one `error:` line and exit status 1.

    Library warnings (orbax notes every read-only checkpoint manager it opens) are shown
    only with `--verbose`."""
    import logging

    if not verbose:
        logging.getLogger('absl').setLevel(logging.ERROR)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - sorted into user mistakes and bugs below
        message = user_error_message(e)
        if message is None:
            raise  # a bug: the traceback is the report
        if verbose:
            traceback.print_exc()
        print(f'error: {message}', file=sys.stderr)
        return 1


def user_error_message(e: Exception) -> str | None:
    """The message of an exception caused by the user's input (the project's
    `flaxnets_errors.UserError`: unknown model or dataset, unreadable weights, ...);
    None for anything else, which is a bug and keeps its traceback."""
    return str(e) if isinstance(e, UserError) else None


def parse_overrides(items: list[str]) -> dict:
    """`['norm=group']` -> {'norm': 'group'} (values as Python literals when they parse)."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ToolError(f'--set takes KEY=VALUE (e.g. --set norm=group), got {item!r}.')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_source_args(args: argparse.Namespace) -> None:
    """Cheap consistency checks of the flags, before any library is loaded."""
    if bool(args.workdir) == bool(args.weights):
        raise ToolError('Give either --workdir W (a train.py run) or --model NAME --weights PATH.')
    if args.weights and not args.model:
        raise ToolError('--weights needs --model NAME, the registered model the weights are for '
                        "(python -c \"import models; print(models.list_models('res*'))\" lists names).")
    if args.workdir and args.model:
        raise ToolError('--model goes with --weights; a --workdir names its own model.')
    path = args.workdir or args.weights
    if args.workdir and os.path.isfile(path):
        raise ToolError(f'--workdir {path} is a file; pass the directory of a train.py run '
                        '(or a weights file as --model NAME --weights FILE).')
    if not os.path.exists(path):
        flag = '--workdir' if args.workdir else '--weights'
        fix = ('pass the --workdir of a train.py run' if args.workdir else
               'pass a weights file or a flaxnets checkpoint directory')
        raise ToolError(f'{flag} {path} does not exist; {fix}.')
    if args.weights and os.path.isfile(path):
        if args.step is not None or args.ema:
            raise ToolError('--step and --ema select a checkpoint of a run; a weights file has '
                            'neither (drop them, or pass the run as --workdir).')
        if not path.lower().endswith(WEIGHT_SUFFIXES):
            raise ToolError(f'--weights {path}: unsupported format; use {", ".join(WEIGHT_SUFFIXES)} '
                            'or a flaxnets workdir / checkpoint directory.')
    if args.batch_size < 0 or args.image_size < 0:
        raise ToolError('--batch-size and --image-size must be positive.')


def import_reference_libraries(needed: bool) -> None:
    """Loads torch/timm/torchvision before TensorFlow when they will be used.

    The regular torch build ships triton, whose native library crashes the interpreter
    when it loads after TensorFlow's (see tests/conftest.py); the other order is fine.
    """
    if not needed:
        return
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    with contextlib.suppress(ImportError):
        import timm  # noqa: F401
    with contextlib.suppress(ImportError):
        import torchvision  # noqa: F401


# ----------------------------------------------------------------------------- weights


@dataclasses.dataclass
class Source:
    """Weights ready to run, and where they came from.

    Attributes:
        model_name: registered model name.
        overrides: model overrides the weights need (`config.model_kwargs`, `--set`).
        num_classes: the classifier's width.
        variables: {'params': ..., 'batch_stats': ...} of host numpy arrays.
        description: human-readable origin (for output and the JSON record).
        step: checkpoint step, None for a weights file.
        ema: whether these are EMA weights.
        workdir: the run directory (config.json, labels.json, eval output), if any.
        output_dir: where evaluation records are written.
        output_stem: file-name prefix of those records ('' for a run).
        run_config: the run's config.json as a dict, if any.
        state_dict: the reference-named arrays of a weights file (for --compare-reference).
        compute_dtype: the run's compute dtype ('float32' without a run).
    """

    model_name: str
    overrides: dict
    num_classes: int
    variables: dict
    description: str
    step: int | None
    ema: bool
    workdir: str | None
    output_dir: str
    output_stem: str
    run_config: dict | None
    state_dict: dict | None
    compute_dtype: str = 'float32'


def _step_folders(directory: str) -> list[int]:
    """Steps with a folder in `directory` (orbax renames a step folder into place once it
    is complete, so these are the candidates; `list_steps` is the authority)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(e.name) for e in os.scandir(directory) if e.name.isdigit() and e.is_dir())


def _has_steps(directory: str) -> bool:
    return bool(_step_folders(directory))


def locate_checkpoints(path: str, flag: str) -> tuple[str, str | None, int | None]:
    """(checkpoint directory, workdir or None, step named by the path or None).

    `path` is a workdir, its `checkpoints/` folder or one step folder. An MPL workdir's
    final student lives in `finetune_checkpoints/` when the run fine-tuned it.
    """
    path = os.path.abspath(path)
    if _has_steps(os.path.join(path, 'finetune_checkpoints')):
        return os.path.join(path, 'finetune_checkpoints'), path, None
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        return os.path.join(path, 'checkpoints'), path, None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
        ckpt_dir = os.path.dirname(path)
        return ckpt_dir, _workdir_of(ckpt_dir), int(base)
    if _has_steps(path):
        return path, _workdir_of(path), None
    rounds = sorted(
        os.path.join(path, r, m) for r in os.listdir(path) if r.startswith('round_')
        for m in ('teacher', 'student') if os.path.isdir(os.path.join(path, r, m))
    )
    if rounds:
        raise ToolError(f'{flag} {path} is a Noisy Student run; its models are in round '
                        f'folders: pass one of them, e.g. {flag} {rounds[-1]}.')
    raise ToolError(f'{flag} {path} has no checkpoints/ folder: it is not a train.py workdir, '
                    'or the run has not been started there; pass the workdir of a run.')


def _workdir_of(ckpt_dir: str) -> str | None:
    parent = os.path.dirname(os.path.normpath(ckpt_dir))
    return parent if os.path.exists(os.path.join(parent, 'config.json')) else None


def list_steps(ckpt_dir: str) -> list[int]:
    """The finished checkpoint steps in `ckpt_dir`, ascending."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_run_config(workdir: str | None) -> dict | None:
    if workdir is None or not os.path.exists(os.path.join(workdir, 'config.json')):
        return None
    with open(os.path.join(workdir, 'config.json')) as f:
        return json.load(f)


def load_source(args: argparse.Namespace) -> Source:
    """Reads the weights `args` name (a run's checkpoint or a --model/--weights file)."""
    if args.weights and os.path.isfile(args.weights):
        return _load_weights_file(args)
    return _load_checkpoint(args)


def _model_kwargs(run_config: dict | None, meta: dict) -> dict:
    kwargs = meta.get('model_kwargs')
    if kwargs is None and run_config is not None:
        kwargs = run_config.get('model_kwargs') or {}
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def _check_model_name(name: str) -> None:
    import models

    models.get_model_cfg(name)  # UnknownModelError names the close matches


def _load_checkpoint(args: argparse.Namespace) -> Source:
    flag = '--workdir' if args.workdir else '--weights'
    ckpt_dir, workdir, path_step = locate_checkpoints(args.workdir or args.weights, flag)
    if args.step is not None and path_step is not None and args.step != path_step:
        raise ToolError(f'{flag} names step {path_step} but --step is {args.step}; give one of the two.')
    step = args.step if args.step is not None else path_step
    # The folder listing answers the common mistakes before orbax (and JAX) load.
    steps = _step_folders(ckpt_dir)
    if steps and (step is None or step in steps):
        steps = list_steps(ckpt_dir)
    if not steps:
        raise ToolError(f'No checkpoint in {ckpt_dir} yet: the run has not finished its first '
                        'checkpoint (config.checkpoint_every_steps); wait for it or resume the run.')
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ToolError(f'No checkpoint for step {step} in {ckpt_dir}; steps there: '
                        f'{", ".join(map(str, steps))} (omit --step for the newest).')

    from trainers.checkpointing import load_checkpoint_meta, load_state_arrays

    run_config = read_run_config(workdir)
    meta = load_checkpoint_meta(ckpt_dir, step)
    name = meta.get('model', '')
    if name.startswith('mpl:') or not name:
        # An MPL checkpoint holds teacher and student; the run's model is the student.
        name = (run_config or {}).get('model') or args.model or ''
    if not name:
        raise ToolError(f'{ckpt_dir} step {step} does not record its model; pass --model NAME '
                        '--weights with this directory.')
    if args.model and args.model != name:
        _check_model_name(args.model)
        raise ToolError(f'{ckpt_dir} holds a {name!r} checkpoint, not {args.model!r}; '
                        f'use --model {name}.')
    _check_model_name(name)
    _, state = load_state_arrays(ckpt_dir, step)
    prefix = 'student_' if 'student_params' in state else ''
    params_key, stats_key = f'{prefix}params', f'{prefix}batch_stats'
    if args.ema:
        params_key, stats_key = f'{prefix}ema_params', f'{prefix}ema_batch_stats'
        if not state.get(params_key):
            raise ToolError(f'--ema: {ckpt_dir} step {step} has no EMA weights (the run was '
                            'trained with ema_decay=0); drop --ema, or train with '
                            '--config.ema_decay=0.999.')
    overrides = {**_model_kwargs(run_config, meta), **parse_overrides(args.set)}
    variables = {'params': state[params_key], 'batch_stats': state.get(stats_key) or {}}
    num_classes = _checkpoint_classes(name, variables, overrides, meta)
    _check_shapes(name, num_classes, overrides, variables, f'{ckpt_dir} step {step}')
    out_dir = workdir or os.path.dirname(ckpt_dir)
    return Source(
        model_name=name, overrides=overrides, num_classes=num_classes, variables=variables,
        description=f'{ckpt_dir} step {step}' + (' (EMA)' if args.ema else ''),
        step=step, ema=args.ema, workdir=workdir, output_dir=out_dir, output_stem='',
        run_config=run_config, state_dict=None,
        compute_dtype=(run_config or {}).get('compute_dtype') or 'float32',
    )


def _flat_shapes(tree: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    from flax import traverse_util

    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _checkpoint_classes(name: str, variables: dict, overrides: dict, meta: dict) -> int:
    """The class count of the checkpoint's classifier (found structurally)."""
    import models
    from trainers import finetune

    if meta.get('num_classes'):
        return int(meta['num_classes'])
    default = models.get_model_cfg(name).num_classes
    have = _flat_shapes(variables)
    for key in sorted(finetune.head_keys(name, default, **overrides)):
        if key[-1] in ('kernel', 'bias') and key in have:
            return int(have[key][-1])
    return default


def _check_shapes(name: str, num_classes: int, overrides: dict, variables: dict, where: str) -> None:
    """Fails when the stored variables are not exactly the model's."""
    import jax
    import jax.numpy as jnp

    import models

    model = models.create_model(name, num_classes=num_classes, **overrides)
    h, w, c = models.get_model_cfg(name).input_size
    want = _flat_shapes(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False)))
    have = _flat_shapes(variables)
    bad = sorted({k for k in want.keys() | have.keys() if want.get(k) != have.get(k)})
    if bad:
        first = '/'.join(bad[0])
        raise ToolError(
            f'{where} does not fit {name} {overrides or ""}with {num_classes} classes: '
            f'{len(bad)} variables differ (first: {first}, stored {have.get(bad[0])}, model '
            f'{want.get(bad[0])}); pass the model overrides the run used (--set KEY=VALUE).')


def _load_weights_file(args: argparse.Namespace) -> Source:
    _check_model_name(args.model)  # before the heavier imports: a typo fails fast
    import models
    from tools.convert_weights import infer_num_classes
    from trainers import finetune

    overrides = parse_overrides(args.set)
    state = finetune.read_state_dict(args.weights)
    try:
        num_classes = args.num_classes or infer_num_classes(args.model, state, overrides)
        num_classes = num_classes or models.get_model_cfg(args.model).num_classes
        variables = models.convert_state_dict(args.model, state, strict=True,
                                              num_classes=num_classes, **overrides)
    except models.ConversionError as e:
        counts = ', '.join(f'{len(v)} {k}' for k, v in (
            ('missing', e.missing), ('unexpected', e.unexpected), ('mis-shaped', e.mismatched)) if v)
        example = (e.missing or e.unexpected or [m[0] for m in e.mismatched] or ['?'])[0]
        raise ToolError(
            f'{args.weights} does not fit {args.model} ({counts}; e.g. {example}): check that '
            f'--model names the model the file was saved from (and --set / --num-classes); '
            f'--verbose, or tools/convert_weights.py, lists every name.') from e
    except NotImplementedError as e:
        raise ToolError(f'{args.weights}: {e}; reference weights files cannot be read for '
                        f'{args.model}, pass a flaxnets checkpoint directory as --weights.') from e
    import jax
    import numpy as np

    variables = {'params': jax.tree.map(np.asarray, variables['params']),
                 'batch_stats': jax.tree.map(np.asarray, variables.get('batch_stats', {}))}
    path = os.path.abspath(args.weights)
    stem = os.path.basename(path)
    for suffix in WEIGHT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return Source(
        model_name=args.model, overrides=overrides, num_classes=num_classes, variables=variables,
        description=path, step=None, ema=False, workdir=None, output_dir=os.path.dirname(path),
        output_stem=f'{stem}.', run_config=None, state_dict=state,
    )


def create_model(source: Source):
    import models
    from trainers import core

    dtype = core.compute_dtype({'compute_dtype': source.compute_dtype})
    return models.create_model(source.model_name, num_classes=source.num_classes, dtype=dtype,
                               **source.overrides)


def device_variables(source: Source, mesh) -> tuple[Any, Any]:
    """(params, batch_stats) replicated on the mesh once, not transferred per batch."""
    import jax

    from trainers import core

    params, stats = jax.device_put(
        (source.variables['params'], source.variables['batch_stats']), core.replicated(mesh))
    return params, stats


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class DataSettings:
    """The eval-mode input pipeline settings of a source."""

    dataset: str | None
    split: str | None
    data_config: Any  # ml_collections.ConfigDict
    image_size: int
    channels: int
    mean: tuple
    std: tuple
    batch_size: int
    info: Any  # input_pipeline.DatasetInfo or None

    def pipeline_kwargs(self) -> dict:
        return dict(image_size=self.image_size, channels=self.channels, mean=self.mean,
                    std=self.std)


def _data_config(source: Source, data_dir: str | None):
    """The run's `config.data` (its eval transform), or the model's timm-style defaults."""
    import ml_collections

    import input_pipeline
    import models

    defaults = input_pipeline.default_data_config()
    run_data = (source.run_config or {}).get('data')
    if run_data:
        config = ml_collections.ConfigDict(run_data)
        for key, value in defaults.items():
            if key not in config:
                config[key] = value
    else:
        config = defaults
        cfg = models.get_model_cfg(source.model_name)
        config.crop_pct = cfg.crop_pct
        config.interpolation = cfg.interpolation
    if data_dir:
        config.data_dir = data_dir
    return config


def dataset_metadata(dataset: str, data_dir: str | None, *, prepared: bool):
    """DatasetInfo of `dataset`; with `prepared`, preparing it (or saying how)."""
    import tensorflow_datasets as tfds

    import input_pipeline
    from input_pipeline import sources

    if prepared or sources.is_folder(dataset):
        return input_pipeline.get_dataset_info(dataset, data_dir)
    try:  # names and image shape come from the builder's code, no data needed
        return sources.tfds_info(dataset, tfds.builder(dataset, data_dir=data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        return input_pipeline.get_dataset_info(dataset, data_dir)  # raises, with close names


def resolve_data(args: argparse.Namespace, source: Source, *, need_split: bool) -> DataSettings:
    """Dataset, split, eval transform, resolution and batch: flags > run config > model."""
    import jax

    import models

    run = source.run_config or {}
    dataset = args.dataset or run.get('dataset')
    data_config = _data_config(source, args.data_dir)
    info, split = None, None
    if need_split:
        if not dataset:
            raise ToolError('No dataset: --model/--weights has no run config; pass --dataset '
                            "NAME (tfds name or 'folder:/path') and --split.")
        info = dataset_metadata(dataset, data_config.data_dir, prepared=True)
        split = args.split or (run.get('eval_split') if dataset == run.get('dataset') else None)
        if split is None:
            split = next((s for s in DEFAULT_SPLITS if s in info.split_sizes), None)
            if split is None:
                raise ToolError(f'Which split of {dataset}? Pass --split (splits: '
                                f'{", ".join(sorted(info.split_sizes))}).')
        base = re.split(r'[\[(]', split, maxsplit=1)[0]
        if info.split_sizes and base not in info.split_sizes:
            raise ToolError(f'{dataset} has no split {base!r}; splits: '
                            f'{", ".join(sorted(info.split_sizes))} (--split).')
        if info.num_classes != source.num_classes:
            raise ToolError(f'{source.model_name} from {source.description} has '
                            f'{source.num_classes} classes but {dataset} has {info.num_classes}; '
                            'evaluate it on a dataset with its own label set (--dataset).')
    elif dataset:
        info = dataset_metadata(dataset, data_config.data_dir, prepared=False)
    cfg = models.get_model_cfg(source.model_name)
    image_size = args.image_size or run.get('image_size') or cfg.input_size[0]
    batch = args.batch_size or run.get('eval_batch_size') or run.get('batch_size') or 128
    n = jax.device_count()
    if batch % n:
        if args.batch_size:
            raise ToolError(f'--batch-size {batch} must be divisible by the {n} devices.')
        batch += n - batch % n
    return DataSettings(dataset=dataset, split=split, data_config=data_config,
                        image_size=int(image_size), channels=cfg.input_size[2], mean=cfg.mean,
                        std=cfg.std, batch_size=int(batch), info=info)


# ----------------------------------------------------------------------------- names


def imagenet_descriptions() -> dict[str, str]:
    """WordNet id -> words ('n01440764' -> 'tench, Tinca tinca') from timm's data files,
    when timm is installed (read as text: timm itself is not imported)."""
    spec = importlib.util.find_spec('timm')
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(spec.submodule_search_locations[0], 'data', '_info',
                        'imagenet_synset_to_lemma.txt')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f if '\t' in line)


def class_names(source: Source, data: DataSettings) -> tuple[list[str] | None, str]:
    """(names in label order or None, where they came from).

    The run's `labels.json` first (written by every training run), then the dataset's
    metadata (tfds `ClassLabel` names, class folders), then, for a 1,000-class model
    without a dataset, ImageNet's WordNet ids from tfds; None means class indices.
    """
    if source.workdir and not (data.dataset and data.dataset != (source.run_config or {}).get('dataset')):
        path = os.path.join(source.workdir, 'labels.json')
        if os.path.exists(path):
            with open(path) as f:
                names = json.load(f)
            if len(names) == source.num_classes:
                return [str(n) for n in names], path
    info = data.info
    if info is not None and info.class_names and len(info.class_names) == source.num_classes:
        return list(info.class_names), f'{data.dataset} metadata'
    if data.dataset is None and source.num_classes == 1000:
        import tensorflow_datasets as tfds

        import input_pipeline  # noqa: F401  (tfds registration, as everywhere else)

        names = tfds.builder('imagenet2012').info.features['label'].names
        return list(names), 'imagenet2012 metadata (tfds)'
    return None, 'class indices (no names known)'
