"""Model registry: ``@register_model`` factories, each with a default :class:`ModelCfg`.

A factory is a function ``def resnet50(**kwargs) -> nn.Module`` whose name is the model
name (timm's name where timm has the model, torchvision's otherwise), or one registered
under an explicit ``name=`` from a visible variant table. Its module fields are the
overrides :func:`create_model` accepts. Every registration names its ``family`` (the key of
its weight-conversion name map, see :mod:`models.convert`) and, in its cfg, its classifier
and first conv; a family module binds its own defaults once::

    register_model = functools.partial(registry.register_model, family='resnet',
                                       classifier='fc', first_conv='conv1')

Where timm names a registered model differently, the timm name is an alias
(:data:`MODEL_ALIASES`): accepted everywhere a model name is, listed by
``list_models(include_aliases=True)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Sequence

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
        classifier: the classifier's module path(s) in the ``params`` tree, ``'/'``-joined
            (``'fc'``, ``'head_fc'``, ``'aux1/fc2'``), as timm's pretrained cfg names it: a
            tuple when there are several (Inception's auxiliary heads, which exist only
            with ``aux_logits=True``). Exactly the variables whose shape depends on
            ``num_classes`` lie under these paths. See :func:`classifier_paths`.
        first_conv: module path of the first convolution (the one that sees the image's
            ``input_size[2]`` channels).
    """

    input_size: tuple[int, int, int] = (224, 224, 3)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = 'bilinear'
    num_classes: int = 1000
    top1: float | None = None
    paper: str = ''
    classifier: str | tuple[str, ...] = ()
    first_conv: str = ''

    def __post_init__(self):
        if self.interpolation not in ('bilinear', 'bicubic'):
            raise ValueError(f'interpolation must be bilinear|bicubic, got {self.interpolation!r}')
        if len(self.mean) != self.input_size[2] or len(self.std) != self.input_size[2]:
            raise ValueError('mean/std need one entry per input channel')
        if not self.classifier or not self.first_conv:
            raise ValueError('a ModelCfg declares its classifier and first_conv module paths')


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    cfg: ModelCfg
    family: str


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    *, family: str, name: str | None = None, **cfg_fields
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory.

    Args:
        family: the model's family, e.g. ``'resnet'``: the key of its weight-conversion
            name map (:func:`models.convert.register_name_map`) unless a map is registered
            under the model's own name.
        name: the registered name; defaults to the factory's function name.
        **cfg_fields: :class:`ModelCfg` fields that differ from the ImageNet defaults;
            ``classifier`` and ``first_conv`` are required.

    Raises:
        ValueError: if the name is already registered or an alias.
    """
    cfg = ModelCfg(**cfg_fields)

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in MODEL_ALIASES:
            raise ValueError(f'model {key!r} is already an alias of {MODEL_ALIASES[key]!r}')
        if key in _REGISTRY:
            raise ValueError(f'model {key!r} is already registered (family {_REGISTRY[key].family!r})')
        _REGISTRY[key] = _Entry(fn, cfg, family)
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
    """The family a registered model was registered with (e.g. ``'resnet'``)."""
    return _entry(name).family


def classifier_paths(name: str) -> tuple[str, ...]:
    """The module paths of a model's classifier, as declared by its :class:`ModelCfg`.

    Each path is ``'/'``-joined into the ``params`` tree (``('fc',)`` for ResNet-50,
    ``('head_fc',)`` for BiT, ``('fc', 'aux1/fc2', 'aux2/fc2')`` for GoogLeNet). The
    variables under these paths are exactly those whose shape changes with
    ``num_classes`` (a test holds every registered model to that). Optional parts may be
    absent from a given model's params (Inception's auxiliary heads exist only with
    ``aux_logits=True``), and a headless model (``num_classes=0``) has none of them, so
    match the paths against the variables at hand, e.g. with :func:`in_classifier`.

    Args:
        name: registered model name or alias.

    Raises:
        UnknownModelError: unknown name.
    """
    declared = _entry(name).cfg.classifier
    return (declared,) if isinstance(declared, str) else tuple(declared)


def in_classifier(name: str, path: str | Sequence[str]) -> bool:
    """Whether a variable or module path lies under one of :func:`classifier_paths`.

    Args:
        name: registered model name or alias.
        path: ``'/'``-joined or a tuple of keys, with or without the collection
            (``('params', 'fc', 'kernel')``, ``'fc/bias'``, ``('aux1', 'fc2')``).
    """
    keys = tuple(path.split('/')) if isinstance(path, str) else tuple(path)
    if keys and keys[0] in ('params', 'batch_stats'):
        keys = keys[1:]
    return any(keys[: len(p)] == p for p in (tuple(c.split('/')) for c in classifier_paths(name)))


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
