"""Every registered model against the shared contract: one test over the whole registry.

For each name, abstractly (`jax.eval_shape`, nothing computed or compiled) at the model's
default input size: the parameter count equals the README model table's (which equals
the timm / torchvision reference's where one exists, see each family's docstring); logits
and features have the contract's shapes and dtypes; the declared classifier paths exist and
are exactly the variables that depend on ``num_classes``; the declared first conv takes the
input's channels; the GroupNorm + weight-standardised bfloat16 twin (with one class more)
keeps float32 parameters and logits, has no ``batch_stats`` and, for a normalised model, the
same parameter tree but for the classifier. A representative of every family and block kind
(:data:`TRAIN_STEPS`, shrunk through its module fields to compile in seconds) also takes a
real train-mode gradient step, in one or the other norm mode, and returns its pooled
features headless. Family files keep what is specific to a family (parity, paper figures,
structure).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from modeltest import (
    abstract_outputs,
    assert_trains,
    normal,
    num_params,
    random_variables,
    readme_param_counts,
)

import models
from models import registry
from models.efficientnet import EFFICIENTNET_ARCH
from models.inception import BN_INCEPTION_STAGES, GOOGLENET_STAGES
from models.inception_v4 import INCEPTION_RESNET_V2_STAGES
from models.mnasnet import MNASNET_B1
from models.mobilenet import MOBILENET_V3_SMALL
from models.nasnet import CellSpec
from models.xception import AlignedBlock

# Registered test models are not in the README table.
TEST_MODEL_PARAMS = {'resnet_tiny': 308_826}

GN_WS = {'norm': 'group', 'weight_std': True}
SHALLOW = {'stage_sizes': (1, 1, 1, 1)}
# Shrunk members built through module fields (the same classes and code paths).
TINY_DENSENET = dict(growth_rate=8, block_config=(2, 2, 2, 2), stem_width=16)
TINY_NFNET = dict(depths=(1, 2, 1, 1), widths=(32, 64, 96, 96), stem_widths=(8, 8, 16, 32), group_size=16)
TINY_EFFNET = dict(width_mult=0.25, depth_mult=0.3)
# One residual unit per stage: the block code is the same, the gradient of 40 compiles minutes.
IRV2_SHORT = tuple(tuple(row[:3] + (min(row[3], 1),) + row[4:] for row in st) for st in INCEPTION_RESNET_V2_STAGES)
TINY_XCEPTION = (
    AlignedBlock(64, (32, 32, 64), 2),
    AlignedBlock(64, (64, 64, 64)),
    AlignedBlock(64, (64, 64, 128), no_skip=True, start_with_relu=False),
)
# A two-combination cell pair (data for the same Cell): the NASNet-A cells' backward takes
# ~1 CPU-minute to compile; their forward is covered op for op by nasnetalarge's parity.
TINY_NASNET = dict(
    cells_per_stage=1, penultimate_filters=384, stem_filters=16,
    normal_cell=CellSpec(((('sep3', 1), ('id', 0)), (('avg3', 0), ('sep3', 2))), (0, 2, 3), False),
    reduction_cell=CellSpec(((('sep3', 1), ('sep3', 0)), (('max3', 1), ('id', 2))), (2, 3), True),
)

# One module (or unit, cell) per stage where a stage is a table: the code paths are the
# same, the gradients of full depth compile for minutes.
SHORT_GOOGLENET = tuple(stage[:1] for stage in GOOGLENET_STAGES)
SHORT_BN_INCEPTION = tuple(stage[:2] for stage in BN_INCEPTION_STAGES)  # stride-2 modules included
SHORT_MOBILENET_V3 = MOBILENET_V3_SMALL[:1] + MOBILENET_V3_SMALL[2:3] + MOBILENET_V3_SMALL[-1:]
SHORT_MNASNET = MNASNET_B1[:2] + MNASNET_B1[-1:]

# name -> (input size, overrides) of the train-mode gradient step; every family and block
# kind once, BatchNorm and GroupNorm + weight standardisation both represented.
TRAIN_STEPS: dict[str, tuple[int, dict]] = {
    'resnet_tiny': (32, {'drop_path_rate': 0.1}),
    'resnet18': (32, {**SHALLOW, **GN_WS}),
    'seresnext50_32x4d': (32, {**SHALLOW, **GN_WS, 'drop_path_rate': 0.2}),
    'legacy_senet154': (32, {**SHALLOW, 'groups': 8, 'drop_path_rate': 0.2}),
    'resnetv2_50x1_bit': (64, SHALLOW),
    'wrn28_2': (32, {'depth': 10, 'drop_rate': 0.2, 'block_drop_rate': 0.3}),
    'densenet_bc_100_12': (32, {**TINY_DENSENET, 'block_drop_rate': 0.1, 'drop_rate': 0.2}),
    'dm_nfnet_f0': (64, {**TINY_NFNET, 'drop_path_rate': 0.1}),
    'alexnet_original': (67, GN_WS),
    'vgg11_bn': (32, {'widths': (8, 16, 32, 64, 64)}),
    'lenet5': (28, {'drop_rate': 0.5}),
    'googlenet': (64, {'stages': SHORT_GOOGLENET}),
    'bn_inception': (64, {**GN_WS, 'stages': SHORT_BN_INCEPTION}),
    'inception_resnet_v2': (75, {'drop_path_rate': 0.2, 'stages': IRV2_SHORT}),
    'efficientnet_b0': (32, {**TINY_EFFNET, 'arch': EFFICIENTNET_ARCH[:3], 'drop_path_rate': 0.2}),
    'squeezenet1_1': (32, {**GN_WS, 'drop_rate': 0.2}),
    'mobilenetv3_small_100': (32, {'arch': SHORT_MOBILENET_V3, 'drop_rate': 0.2, 'drop_path_rate': 0.1}),
    'mnasnet0_5': (32, {**GN_WS, 'arch': SHORT_MNASNET, 'drop_rate': 0.2, 'drop_path_rate': 0.1}),
    'xception65': (32, {'blocks': TINY_XCEPTION, **GN_WS, 'drop_path_rate': 0.2}),
    'shufflenet_v1_g3': (32, {'stage_repeats': (2, 1, 1), **GN_WS, 'drop_path_rate': 0.2}),
    'shufflenet_v2_x0_5': (32, {'stage_repeats': (2, 1, 1)}),
    'nasnetamobile': (32, {**TINY_NASNET, 'drop_path_rate': 0.2}),
}

# Feature maps at the default input size, (H, W, C) without the batch: the strides and
# widths of the references' tables.
FEATURES: dict[str, dict[str, tuple[int, ...]]] = {
    'resnet50': {'stem': (56, 56, 64), 'stage1': (56, 56, 256), 'stage2': (28, 28, 512),
                 'stage3': (14, 14, 1024), 'stage4': (7, 7, 2048), 'pre_logits': (2048,)},
    'legacy_senet154': {'stem': (56, 56, 128), 'stage1': (56, 56, 256), 'stage2': (28, 28, 512),
                        'stage3': (14, 14, 1024), 'stage4': (7, 7, 2048), 'pre_logits': (2048,)},
    'resnetv2_50x1_bit': {'stem': (56, 56, 64), 'stage1': (56, 56, 256), 'stage2': (28, 28, 512),
                          'stage3': (14, 14, 1024), 'stage4': (7, 7, 2048), 'pre_logits': (2048,)},
    'wrn28_10': {'stem': (32, 32, 16), 'stage1': (32, 32, 160), 'stage2': (16, 16, 320),
                 'stage3': (8, 8, 640), 'pre_logits': (640,)},
    'densenet121': {'stem': (56, 56, 64), 'stage1': (56, 56, 256), 'stage2': (28, 28, 512),
                    'stage3': (14, 14, 1024), 'stage4': (7, 7, 1024), 'pre_logits': (1024,)},
    'densenet_bc_100_12': {'stem': (32, 32, 24), 'stage1': (32, 32, 216), 'stage2': (16, 16, 300),
                           'stage3': (8, 8, 342), 'pre_logits': (342,)},
    'dm_nfnet_f0': {'stem': (48, 48, 128), 'stage1': (48, 48, 256), 'stage2': (24, 24, 512),
                    'stage3': (12, 12, 1536), 'stage4': (6, 6, 1536), 'pre_logits': (3072,)},
    'alexnet': {'stem': (27, 27, 64), 'stage1': (13, 13, 192), 'stage2': (13, 13, 384),
                'stage3': (13, 13, 256), 'stage4': (6, 6, 256), 'pre_logits': (4096,)},
    'vgg16': {'stem': (112, 112, 64), 'stage1': (56, 56, 128), 'stage2': (28, 28, 256),
              'stage3': (14, 14, 512), 'stage4': (7, 7, 512), 'pre_logits': (4096,)},
    'lenet5': {'c1': (28, 28, 6), 's2': (14, 14, 6), 'c3': (10, 10, 16), 's4': (5, 5, 16),
               'c5': (1, 1, 120), 'pre_logits': (84,)},
    'googlenet': {'stem': (28, 28, 192), 'stage1': (28, 28, 480), 'stage2': (14, 14, 832),
                  'stage3': (7, 7, 1024), 'pre_logits': (1024,)},
    'inception_v3': {'stem': (35, 35, 192), 'stage1': (35, 35, 288), 'stage2': (17, 17, 768),
                     'stage3': (8, 8, 2048), 'pre_logits': (2048,)},
    'inception_v4': {'stem': (35, 35, 384), 'stage1': (35, 35, 384), 'stage2': (17, 17, 1024),
                     'stage3': (8, 8, 1536), 'pre_logits': (1536,)},
    'inception_resnet_v2': {'stem': (35, 35, 320), 'stage1': (35, 35, 320), 'stage2': (17, 17, 1088),
                            'stage3': (8, 8, 1536), 'pre_logits': (1536,)},
    'tf_efficientnet_b0': {'stem': (112, 112, 32), 'stage1': (112, 112, 16), 'stage2': (56, 56, 24),
                           'stage3': (28, 28, 40), 'stage4': (14, 14, 80), 'stage5': (14, 14, 112),
                           'stage6': (7, 7, 192), 'stage7': (7, 7, 320), 'pre_logits': (1280,)},
    'mobilenetv1_025': {'stem': (112, 112, 8), 'stage1': (112, 112, 16), 'stage2': (56, 56, 32),
                        'stage3': (28, 28, 64), 'stage4': (14, 14, 128), 'stage5': (7, 7, 256),
                        'pre_logits': (256,)},
    'squeezenet1_0': {'stem': (54, 54, 96), 'stage1': (54, 54, 256), 'stage2': (27, 27, 512),
                      'stage3': (13, 13, 512), 'pre_logits': (512,)},
    'legacy_xception': {'stem': (147, 147, 64), 'stage1': (74, 74, 128), 'stage2': (37, 37, 256),
                        'stage3': (19, 19, 728), 'stage4': (10, 10, 2048), 'pre_logits': (2048,)},
    'shufflenet_v2_x1_0': {'stem': (56, 56, 24), 'stage1': (28, 28, 116), 'stage2': (14, 14, 232),
                           'stage3': (7, 7, 464), 'pre_logits': (1024,)},
    'nasnetamobile': {'stem': (28, 28, 88), 'stage1': (28, 28, 264), 'stage2': (14, 14, 528),
                      'stage3': (7, 7, 1056), 'pre_logits': (1056,)},
}  # fmt: skip


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize('name', models.list_models())
def test_model(name):
    cfg = models.get_model_cfg(name)
    h, w, c = cfg.input_size
    shape = (2, h, w, c)
    fields = registry.model_fields(type(models.create_model(name)))
    # Auxiliary heads are part of the declared classifier: build them where they exist.
    aux = {'aux_logits': True} if 'aux_logits' in fields else {}

    model = models.create_model(name)
    (logits, feats), variables = abstract_outputs(model, shape, return_features=True)
    params = _flat_shapes(variables['params'])
    assert num_params(variables['params']) == {**readme_param_counts(), **TEST_MODEL_PARAMS}[name]
    assert logits.shape == (2, cfg.num_classes) and logits.dtype == jnp.float32
    assert set(variables) == ({'params', 'batch_stats'} if model.norm == 'batch' else {'params'})
    pre_logits = feats['pre_logits']
    assert pre_logits.ndim == 2 and pre_logits.dtype == jnp.float32
    assert all(f.shape[0] == 2 and f.ndim == 4 for k, f in feats.items() if k != 'pre_logits')
    if name in FEATURES:
        assert {k: f.shape[1:] for k, f in feats.items()} == FEATURES[name]

    # The declared first conv sees the image's channels.
    first = variables['params']
    for key in cfg.first_conv.split('/'):
        first = first[key]
    assert first['kernel'].shape[2] == c, cfg.first_conv

    # The GN + weight-standardised twin in bfloat16, in the other padding mode, with one
    # class more (and the auxiliary heads, part of the declared classifier, where the model
    # has them): float32 parameters and logits, no batch_stats. GN scale/bias replace BN's
    # one for one and padding adds no parameters (converted weights load in either mode),
    # so its tree is the model's but for the classifier; a norm-free model (whose twin
    # gains norms and loses conv biases) is compared with its weight-standardised twin.
    overrides = {'weight_std': True} if model.norm == 'none' else GN_WS
    padding = 'symmetric' if model.padding == 'tf_same' else 'tf_same'
    twin = models.create_model(
        name, num_classes=cfg.num_classes + 1, dtype=jnp.bfloat16, padding=padding, **overrides, **aux
    )
    assert twin.padding == padding
    (twin_logits, twin_feats), twin_vars = abstract_outputs(twin, shape, return_features=True)
    assert set(twin_vars) == {'params'}
    assert {p.dtype for p in jax.tree.leaves(twin_vars)} == {jnp.dtype(jnp.float32)}
    assert twin_logits.shape == (2, cfg.num_classes + 1) and twin_logits.dtype == jnp.float32
    # Feature maps in bfloat16 (NASNet's: float32, its padding-excluding average pools
    # divide by float32 window counts).
    bf16 = [f.dtype == jnp.bfloat16 for k, f in twin_feats.items() if k != 'pre_logits']
    assert any(bf16) or models.get_model_family(name) == 'nasnet'

    # The declared classifier: exactly the variables whose shape depends on num_classes.
    base = _flat_shapes(abstract_outputs(models.create_model(name, **aux), shape)[1]['params']) if aux else params
    more = _flat_shapes(twin_vars['params'])
    changed = {k for k in base.keys() | more.keys() if base.get(k) != more.get(k)}
    declared = {k for k in base if models.in_classifier(name, k)}
    assert changed == declared, sorted(changed ^ declared)
    for path in map(lambda p: tuple(p.split('/')), models.classifier_paths(name)):
        assert any(k[: len(path)] == path for k in base), path
    head_in = [s for k, s in params.items() if k[-1] == 'kernel' and models.in_classifier(name, k)][0]
    assert head_in[-2] == pre_logits.shape[1]  # the main classifier reads pre_logits

    if name in TRAIN_STEPS:
        # A real train-mode gradient step of the shrunk model, and its headless twin
        # returning the pooled features.
        size, overrides = TRAIN_STEPS[name]
        small = models.create_model(name, num_classes=5, **overrides)
        x = normal((2, size, size, c), seed=1)
        assert_trains(small, random_variables(small, x.shape), x)
        (pooled, small_feats), headless = abstract_outputs(small.clone(num_classes=0), x.shape, return_features=True)
        assert pooled.shape == small_feats['pre_logits'].shape and pooled.dtype == jnp.float32
        assert not any(models.in_classifier(name, k) for k in _flat_shapes(headless))


def test_classifier_helpers():
    assert models.classifier_paths('resnet50') == ('fc',)
    assert models.classifier_paths('resnetv2_50x1_bit') == ('head_fc',)
    assert models.classifier_paths('legacy_senet154') == ('last_linear',)
    assert models.classifier_paths('squeezenet1_0') == ('classifier_1',)
    assert models.classifier_paths('googlenet') == ('fc', 'aux1/fc2', 'aux2/fc2')
    assert models.classifier_paths('mobilenetv2_100') == ('classifier_1',)  # an alias
    assert models.in_classifier('googlenet', ('params', 'aux1', 'fc2', 'kernel'))
    assert models.in_classifier('googlenet', 'fc/bias')
    assert not models.in_classifier('googlenet', ('params', 'aux1', 'fc1', 'kernel'))
    assert not models.in_classifier('resnet50', ('params', 'fcx', 'kernel'))
    with pytest.raises(models.UnknownModelError):
        models.classifier_paths('resnt50')


def test_fields_are_validated_with_one_message():
    with pytest.raises(ValueError, match=r"ResNet: norm='layer' is not valid; valid values: 'batch', 'group', 'none'"):
        models.create_model('resnet18', norm='layer')
    with pytest.raises(ValueError, match=r"DenseNet: stem='tiny' is not valid; valid values: 'imagenet', 'cifar'"):
        models.create_model('densenet121', stem='tiny')
    with pytest.raises(ValueError, match=r"padding='reflect' is not valid; valid values: 'symmetric', 'tf_same'"):
        models.create_model('nasnetamobile', padding='reflect')
    with pytest.raises(ValueError, match=r'drop_rate=1.5 is not valid; valid values: >= 0.0 and < 1.0'):
        models.create_model('vgg11', drop_rate=1.5)
    with pytest.raises(ValueError, match=r'WideResNet: depth=27 .* 6n \+ 4'):
        models.create_model('wrn28_2', depth=27)
    # norm='none' is a norm-free twin for every family, ResNet included.
    assert models.create_model('resnet18', norm='none').norm == 'none'
