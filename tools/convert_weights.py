"""Convert a reference weights file into an orbax checkpoint of our model.

    python tools/convert_weights.py --model resnet50 --weights resnet50.safetensors \\
        --out /tmp/flaxnets/resnet50_tv
    python train.py --config configs/bit_finetune.py --config.init_from=/tmp/flaxnets/resnet50_tv ...

The file is a state dict in the reference's naming: `.safetensors`, `.npz` (timm exports
and BiT's `BiT-M-R50x1.npz`, whose TensorFlow names are recognised) or a PyTorch file
read with `torch.load(weights_only=True)`. It is converted strictly by the model family's
name map: any missing, unexpected or mis-shaped entry is listed and the tool exits with
status 1, writing nothing. The class count is read from the file's classifier unless
`--num-classes` is given. `--out` receives `checkpoints/0/` (params and BatchNorm
statistics), the layout `config.init_from` reads.

When timm / torchvision is installed and has the model, the reference model is built,
loaded with the same file, and both run on random images in eval mode; the largest
absolute logit difference is printed, and a relative difference (to the largest logit)
above `--rtol` exits with status 2
(the checkpoint is still written, for inspection).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from tools import inference  # noqa: E402
from trainers import finetune  # noqa: E402
from trainers.checkpointing import Checkpointer, tree_fingerprint  # noqa: E402

# Model names that both timm and torchvision have, where our name map follows
# torchvision's naming (timm's VGG renames the classifier).
TORCHVISION_FIRST = ('vgg',)


def parse_overrides(items: list[str]) -> dict:
    """`['norm=group', 'drop_rate=0.1']` -> model overrides (`tools.inference`'s parser)."""
    try:
        return inference.parse_overrides(items)
    except inference.ToolError as e:
        raise SystemExit(str(e)) from None


def infer_num_classes(model_name: str, state: dict, overrides: dict) -> int | None:
    """The class count of the file's classifier (None if the file has no classifier)."""
    default = models.get_model_cfg(model_name).num_classes
    head = finetune.head_keys(model_name, default, **overrides)
    renamed = finetune.state_dict_to_pretrained(model_name, state, '').arrays
    for key in sorted(head):
        if key[-1] in ('kernel', 'bias') and key in renamed:
            return int(renamed[key].shape[-1])
    return None


def reference_model(name: str, num_classes: int, state: dict | None = None):
    """(torch model, description) of the reference with this name, or (None, reason).

    torchvision builds GoogLeNet / Inception v3 with auxiliary heads when no weights are
    requested; they are kept only when `state` has them (published files do not)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, 'torch is not installed'
    candidates = []
    try:
        import timm

        if name in timm.list_models():
            candidates.append(('timm', lambda: timm.create_model(name, pretrained=False, num_classes=num_classes)))
    except ImportError:
        pass
    try:
        import torchvision

        if name in torchvision.models.list_models():
            kwargs = {'num_classes': num_classes}
            if name in ('googlenet', 'inception_v3'):
                kwargs['aux_logits'] = state is not None and any(k.startswith('aux') for k in state)
                kwargs['init_weights'] = True  # silences torchvision's init warning
            entry = ('torchvision', lambda: torchvision.models.get_model(name, weights=None, **kwargs))
            if name.startswith(TORCHVISION_FIRST):
                candidates.insert(0, entry)
            else:
                candidates.append(entry)
    except ImportError:
        pass
    if not candidates:
        return None, f'neither timm nor torchvision has {name!r}'
    lib, make = candidates[0]
    return make(), lib


def parity_error(model_name: str, variables: dict, state: dict, reference, *, resolution: int,
                 overrides: dict, num_classes: int, seed: int = 0) -> tuple[float, float]:
    """(max |logit difference|, largest |logit|) of our model vs `reference` loaded with `state`."""
    import torch

    missing, unexpected = reference.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise RuntimeError(
            f'the reference model does not take this file either (missing {missing[:5]}, '
            f'unexpected {unexpected[:5]})'
        )
    reference.eval()
    channels = models.get_model_cfg(model_name).input_size[2]
    x = np.random.default_rng(seed).standard_normal((2, channels, resolution, resolution)).astype(np.float32)
    with torch.no_grad():
        out = reference(torch.from_numpy(x))
        expected = (out[0] if isinstance(out, tuple) else out).numpy()
    model = models.create_model(model_name, num_classes=num_classes, **overrides)
    got = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x.transpose(0, 2, 3, 1)))
    return float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))


def save_checkpoint(out_dir: str, model_name: str, variables: dict, meta_extra: dict) -> str:
    meta = {
        'model': model_name,
        'param_fingerprint': tree_fingerprint(variables['params']),
        **meta_extra,
    }
    ckpt = Checkpointer(os.path.join(out_dir, 'checkpoints'), meta, max_to_keep=1, async_save=False)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise FileExistsError(f'{out_dir} already holds a checkpoint; choose a new --out.')
    state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    ckpt.save(0, state, force=True)
    ckpt.close()
    return os.path.join(out_dir, 'checkpoints', '0')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='registered model name (models.list_models())')
    parser.add_argument('--weights', required=True, help='.safetensors / .npz / .pth|.pt|.bin file')
    parser.add_argument('--out', required=True, help='directory for the orbax checkpoint')
    parser.add_argument('--num-classes', type=int, default=None, help="default: read from the file's head")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='model override, e.g. --set norm=group (repeatable)')
    parser.add_argument('--resolution', type=int, default=0, help="parity check size (default: model's)")
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='parity tolerance: max |logit diff| / max(1, max |logit|)')
    parser.add_argument('--no-parity', action='store_true', help='skip the reference comparison')
    args = parser.parse_args(argv)

    try:
        models.get_model_cfg(args.model)
        overrides = parse_overrides(args.set)
        state = finetune.read_state_dict(args.weights)  # BiT .npz come back in timm names
        num_classes = args.num_classes or infer_num_classes(args.model, state, overrides)
        variables = models.convert_state_dict(
            args.model, state, strict=True, num_classes=num_classes, **overrides
        )
    except (finetune.WeightsFileError, models.ConversionError, models.UnknownModelError,
            NotImplementedError) as e:
        print(f'error: {e}', file=sys.stderr)
        print(f'{args.weights} was not converted to {args.model}; nothing was written.', file=sys.stderr)
        return 1
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
    print(f'converted {args.weights} -> {args.model} ({n:,} parameters, {num_classes} classes)')
    where = save_checkpoint(args.out, args.model, variables, {
        'source': os.path.abspath(args.weights), 'num_classes': num_classes, 'model_kwargs': overrides,
    })
    print(f'wrote {where} (use: --config.init_from={os.path.abspath(args.out)})')

    if args.no_parity:
        return 0
    reference, lib = reference_model(args.model, num_classes, state)
    if reference is None:
        print(f'parity check skipped: {lib}')
        return 0
    resolution = args.resolution or models.get_model_cfg(args.model).input_size[0]
    err, peak = parity_error(args.model, variables, state, reference, resolution=resolution,
                             overrides=overrides, num_classes=num_classes)
    rel = err / max(1.0, peak)
    print(f'parity vs {lib} at {resolution}px on random images: max |logit diff| {err:.3g} '
          f'(largest |logit| {peak:.3g}, relative {rel:.3g}, tolerance {args.rtol:g})')
    if rel > args.rtol:
        print('error: logits differ beyond the tolerance', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
