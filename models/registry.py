"""Model registry: ``@register_model`` factories, each with a default :class:`ModelCfg`.

A factory is a function ``def resnet50(**kwargs) -> nn.Module`` whose name is the model
name (timm's name where timm has the model, torchvision's otherwise). Its module fields are
the overrides :func:`create_model` accepts.

Where timm names a registered model differently, the timm name is an alias
(:data:`MODEL_ALIASES`): accepted everywhere a model name is, listed by
``list_models(include_aliases=True)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable

import flax.linen as nn

from flaxnets_errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fields every flax Module has that are not model hyperparameters.
_MODULE_INTERNAL_FIELDS = frozenset({'parent', 'name'})


class UnknownModelError(UserError, ValueError):
    """Raised by :func:`create_model` / :func:`get_model_cfg` for an unregistered name."""


class ModelOverrideError(UserError, TypeError):
    """Raised by :func:`create_model` for an override the model's module has no field for."""


# Other names of registered models: alias -> registered name. An alias is the same
# architecture with the same default config (tests/test_cli_misc.py checks each against
# timm's parameter count); only exact equivalents belong here. Weights given under an
# alias take the registered model's reference naming (torchvision's for mobilenet_v2 and
# the mnasnets). Not aliases: torchvision's mobilenet_v3_large/small (BatchNorm eps 1e-3,
# ours and timm's 1e-5), timm's nfnet_f*, efficientnet_l2, tf_mobilenetv3_* (another
# padding than our dm_nfnet_f*, tf_efficientnet_l2, mobilenetv3_*), senet154 and the
# legacy_se* ResNets (other stem pooling or stride placement).
MODEL_ALIASES: dict[str, str] = {
    # timm.list_models() names; torchvision's MobileNetV2 / MNASNet give equal logits.
    'mobilenetv2_100': 'mobilenet_v2',
    'mnasnet_050': 'mnasnet0_5',
    'mnasnet_075': 'mnasnet0_75',
    'mnasnet_100': 'mnasnet1_0',
    # Older timm names that timm.create_model still accepts (with a deprecation warning).
    'xception': 'legacy_xception',
    'mnasnet_a1': 'semnasnet_100',
    'mnasnet_b1': 'mnasnet1_0',
    'efficientnet_b2a': 'efficientnet_b2',
    'efficientnet_b3a': 'efficientnet_b3',
}


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    """Default data and evaluation settings of a registered model.

    Attributes:
        input_size: (H, W, C) resolution the model is evaluated at by default.
        mean: per-channel mean in [0, 1] pixel units.
        std: per-channel standard deviation in [0, 1] pixel units.
        crop_pct: centre-crop fraction at evaluation (resize to size / crop_pct, then crop).
        interpolation: ``'bilinear'`` or ``'bicubic'`` resize.
        num_classes: default head size.
        top1: published ImageNet top-1 accuracy in % of the reference weights, where one
            exists (None otherwise, e.g. LeNet-5).
        paper: citation of the architecture.
    """

    input_size: tuple[int, int, int] = (224, 224, 3)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = 'bilinear'
    num_classes: int = 1000
    top1: float | None = None
    paper: str = ''

    def __post_init__(self):
        if self.interpolation not in ('bilinear', 'bicubic'):
            raise ValueError(f'interpolation must be bilinear|bicubic, got {self.interpolation!r}')
        if len(self.mean) != self.input_size[2] or len(self.std) != self.input_size[2]:
            raise ValueError('mean/std need one entry per input channel')


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    cfg: ModelCfg
    family: str


_REGISTRY: dict[str, _Entry] = {}


def register_model(**cfg_fields) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under its function name.

    Args:
        **cfg_fields: :class:`ModelCfg` fields that differ from the ImageNet defaults.

    Raises:
        ValueError: if the name is already registered.
    """
    cfg = ModelCfg(**cfg_fields)

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in MODEL_ALIASES:
            raise ValueError(f'model {name!r} is already an alias of {MODEL_ALIASES[name]!r}')
        if name in _REGISTRY:
            raise ValueError(f'model {name!r} is already registered (by {_REGISTRY[name].factory.__module__})')
        # The family (module file name) selects the weight-conversion name map.
        _REGISTRY[name] = _Entry(fn, cfg, fn.__module__.rsplit('.', 1)[-1])
        return fn

    return decorator


def resolve_model_name(name: str) -> str:
    """The registered name behind ``name`` (itself, or the model an alias names).

    Raises:
        UnknownModelError: neither a registered name nor an alias (close names listed).
    """
    name = MODEL_ALIASES.get(name, name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, [*_REGISTRY, *MODEL_ALIASES], n=5, cutoff=0.6)
        hint = f' Did you mean: {", ".join(close)}?' if close else ''
        raise UnknownModelError(
            f'Unknown model {name!r}.{hint} models.list_models(\'pattern*\') shows all '
            f'{len(_REGISTRY)} registered models.'
        )
    return name


def _entry(name: str) -> _Entry:
    return _REGISTRY[resolve_model_name(name)]


def list_models(pattern: str = '*', include_aliases: bool = False) -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, sorted.

    Args:
        pattern: fnmatch pattern, e.g. ``'resnet*'``.
        include_aliases: also list the aliases (:data:`MODEL_ALIASES`) that match; each
            builds the model it names, so iterating with aliases visits models twice.
    """
    names = [*_REGISTRY, *MODEL_ALIASES] if include_aliases else _REGISTRY
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def get_model_cfg(name: str) -> ModelCfg:
    """The default :class:`ModelCfg` of a registered model."""
    return _entry(name).cfg


def get_model_family(name: str) -> str:
    """The family (defining module's file name, e.g. ``'resnet'``) of a registered model."""
    return _entry(name).family


def model_fields(module_cls: type[nn.Module]) -> list[str]:
    """Hyperparameter field names a module class accepts."""
    return [
        f.name for f in dataclasses.fields(module_cls) if f.init and f.name not in _MODULE_INTERNAL_FIELDS
    ]


def create_model(name: str, num_classes: int | None = None, **overrides) -> nn.Module:
    """Builds a registered model.

    Args:
        name: registered model name or alias (see :func:`list_models`).
        num_classes: head size; None means the model's default (``ModelCfg.num_classes``);
            0 makes the model return pooled features instead of logits.
        **overrides: module fields to change, e.g. ``norm='group', weight_std=True``.

    Raises:
        UnknownModelError: unknown name (the message lists close names).
        ModelOverrideError: an override that is not a field of the model's module.
    """
    entry = _entry(name)
    if num_classes is None:
        num_classes = entry.cfg.num_classes
    if overrides:
        # Build the default first so the error can name the fields of the actual module.
        accepted = model_fields(type(entry.factory()))
        bad = sorted(set(overrides) - set(accepted))
        if bad:
            raise ModelOverrideError(
                f'{name}: unknown override(s) {", ".join(map(repr, bad))}; '
                f'accepted fields: {", ".join(accepted)}'
            )
    return entry.factory(num_classes=num_classes, **overrides)
