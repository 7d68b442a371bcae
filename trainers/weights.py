"""Reading weights files: reference state dicts (`.safetensors`, `.npz`, BiT's `.npz`,
PyTorch files read with `weights_only=True`) as flat name -> numpy array mappings.

Fine-tuning (`config.init_from`), the Noisy Student teacher (`config.teacher.checkpoint`)
and the tools (`convert_weights`, `predict`, `evaluate`) all read weights files here.
Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxnets_errors import UserError

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
WEIGHT_SUFFIXES = ('.safetensors', '.npz', *TORCH_SUFFIXES)


class WeightsFileError(UserError, ValueError):
    """A weights file is missing, truncated, malformed or of an unsupported format."""



def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a reference weights file into a flat name -> array mapping.

    BiT's released `.npz` files (TensorFlow names) come back in timm's ResNetV2 naming
    (:func:`bit_to_timm`), so every result is ready for the families' name maps.

    Raises:
        WeightsFileError: naming the file and what is wrong with it.
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f'Weights file {path!r} does not exist.')
    lower = path.lower()
    try:
        if lower.endswith('.npz'):
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        elif lower.endswith('.safetensors'):
            from safetensors.numpy import load_file

            state = load_file(path)
        elif lower.endswith(TORCH_SUFFIXES):
            state = _read_torch(path)
        else:
            raise WeightsFileError(
                f'{path!r}: unsupported weights format; use one of {", ".join(WEIGHT_SUFFIXES)} '
                f'or a flaxnets workdir / orbax checkpoint directory.'
            )
    except WeightsFileError:
        raise
    except Exception as e:  # zipfile, safetensors and torch each raise their own types
        raise WeightsFileError(
            f'Could not read weights file {path!r} ({type(e).__name__}: {e}). The file is '
            f'truncated, corrupt or not in the format its suffix says; download or export '
            f'it again.'
        ) from e
    if not state:
        raise WeightsFileError(f'Weights file {path!r} holds no arrays.')
    return bit_to_timm(state) if is_bit_npz(state) else state


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise WeightsFileError(
            f'{path!r} is a PyTorch file and torch is not installed: pip install torch, or '
            f'convert the file to .safetensors / .npz.'
        ) from e
    # weights_only: tensors and plain containers only; arbitrary pickled objects fail.
    obj = torch.load(path, map_location='cpu', weights_only=True)
    # Training checkpoints wrap the weights; take the usual wrappers' inner dict.
    for key in ('state_dict', 'model', 'model_state_dict', 'module'):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f'{path!r} holds a {type(obj).__name__}, not a state dict.')
    out = {}
    for name, value in obj.items():
        if not hasattr(value, 'detach'):
            continue  # e.g. a stored epoch counter next to the tensors
        name = name.removeprefix('module.')  # DistributedDataParallel prefix
        tensor = value.detach().cpu()
        # bfloat16 / float16 files: numpy has no bfloat16, and our params are float32.
        out[name] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return out


def bit_to_timm(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames BiT's released `.npz` (TensorFlow names, HWIO kernels) to timm's ResNetV2.

    Layout of the files from the BiT repository (Kolesnikov et al. 2020), e.g.
    `BiT-M-R50x1.npz`: `resnet/root_block/standardized_conv2d/kernel`, per unit
    `resnet/block{b}/unit{uu}/{a,b,c}/{standardized_conv2d/kernel, group_norm/gamma|beta}`
    and `.../a/proj/standardized_conv2d/kernel` for the projection shortcut, then
    `resnet/group_norm/{gamma,beta}` and the 1x1-conv classifier `resnet/head/conv2d`.
    Units are pre-activation: group norm `a` precedes conv `a`, as timm's norm1/conv1.
    """
    out: dict[str, np.ndarray] = {}
    unit = re.compile(r'resnet/block(\d+)/unit(\d+)/(.+)')
    convs = {'a': '1', 'b': '2', 'c': '3'}
    for name, value in state.items():
        value = np.asarray(value)
        if name.endswith(('gamma', 'beta')):
            value = value.reshape(-1)  # some exports keep (1, 1, 1, C)
        elif value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
        leaf = {'kernel': 'weight', 'gamma': 'weight', 'beta': 'bias', 'bias': 'bias'}.get(
            name.rpartition('/')[2]
        )
        m = unit.fullmatch(name)
        if m:
            b, u, rest = int(m[1]) - 1, int(m[2]) - 1, m[3]
            prefix = f'stages.{b}.blocks.{u}'
            if rest == 'a/proj/standardized_conv2d/kernel':
                out[f'{prefix}.downsample.conv.weight'] = value
                continue
            part, _, tail = rest.partition('/')
            if part in convs and tail == 'standardized_conv2d/kernel':
                out[f'{prefix}.conv{convs[part]}.weight'] = value
                continue
            if part in convs and tail in ('group_norm/gamma', 'group_norm/beta'):
                out[f'{prefix}.norm{convs[part]}.{leaf}'] = value
                continue
        elif name == 'resnet/root_block/standardized_conv2d/kernel':
            out['stem.conv.weight'] = value
            continue
        elif name in ('resnet/group_norm/gamma', 'resnet/group_norm/beta'):
            out[f'norm.{leaf}'] = value
            continue
        elif name in ('resnet/head/conv2d/kernel', 'resnet/head/conv2d/bias'):
            out[f'head.fc.{leaf}'] = value
            continue
        out[name] = value  # reported as unexpected by the strict check
    return out


def is_bit_npz(state: Mapping[str, Any]) -> bool:
    return any(k.startswith('resnet/root_block/') for k in state)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()
