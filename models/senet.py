"""SENet-154 in the layout of the original (Caffe) release, timm's ``legacy_senet154``.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019.
SENet-154 is SE-ResNeXt-152 (64x4d) with the modifications of the paper's Appendix:
a deep stem (three 3x3 convs, 64-64-128 channels) instead of the 7x7 conv, bottleneck
1x1 convs at half the output width, 3x3 stride-2 projection shortcuts (1x1 only in
stage 1, where only the width changes), and dropout 0.2 before the classifier. The
squeeze-excitation gate uses r = 16 (Sec. 6.1) with biased 1x1 convs.

Differences from :mod:`models.resnet` that are part of the reference and kept here, so
its weights (state-dict names ``layer0.conv1``, ``layerN.M.se_module.fc1``,
``last_linear``) load with ``models.convert_state_dict``:

* the stem pool is a 3x3/2 max-pool with ``ceil_mode=True`` and no padding (Caffe
  compatibility): the bottom/right edge gets a partial window instead of a padded one;
* in every block the stride sits on the grouped 3x3 conv (as in ResNet v1.5).

timm also has a ``senet154`` (the Gluon port, a ``resnet.py`` model with different
names); that one is not this module, so no ``senet154`` alias is registered here.
Parameters: 115,088,984 (timm ``legacy_senet154``, sum of ``numel()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER = 'Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018'

# name -> (blocks per stage, cardinality, stem width); Hu et al. 2018, Appendix / Table 14.
SENET_VARIANTS: dict[str, tuple[tuple[int, ...], int, int]] = {
    'senet154': ((3, 8, 36, 3), 64, 128),
}


def _ceil_pool_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """Bottom/right padding that turns a VALID pool into torch's ``ceil_mode=True`` pool."""
    out = math.ceil((size - window) / stride) + 1
    # torch drops a last window that would start outside the input; with no left
    # padding it never does, since (out - 1) * stride <= size - window + stride - 1.
    return 0, max((out - 1) * stride + window - size, 0)


class SEBottleneck(nn.Module):
    """SENet-154 bottleneck: 1x1 (2 * planes), grouped 3x3 (4 * planes), 1x1, SE gate.

    Attributes:
        planes: a quarter of the block's output width.
        strides: stride of the grouped 3x3 conv and of the projection shortcut.
        groups: cardinality of the 3x3 conv.
        down_kernel: kernel size of the projection shortcut conv (3, or 1 in stage 1).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic-depth rate of the residual branch.
        zero_init_last: start the branch's last norm scale at 0.
        reduction: SE reduction ratio r.
        dtype: compute dtype of the SE gate.
    """

    planes: int
    strides: int
    groups: int
    down_kernel: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    reduction: int = 16
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.planes * 4
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.conv(self.planes * 2, 1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        conv2 = self.conv(out_features, 3, self.strides, feature_group_count=self.groups, name='conv2')
        y = conv2(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(out_features, 1, name='conv3')(y)
        y = self.norm(name='bn3', scale_init=last_scale)(y)
        # The reference's SEModule takes channels // reduction, no rounding to 8.
        y = layers.SqueezeExcite(
            rd_channels=out_features // self.reduction, dtype=self.dtype, name='se_module'
        )(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            down = self.conv(out_features, self.down_kernel, self.strides, name='downsample_conv')
            shortcut = self.norm(name='downsample_bn')(down(x))
        return nn.relu(shortcut + layers.DropPath(self.drop_path_rate)(y, train))


class SENet(nn.Module):
    """SENet (legacy Caffe layout; see the module docstring).

    Attributes:
        stage_sizes: blocks per stage.
        groups: cardinality of the grouped 3x3 convs.
        stem_width: output channels of the deep stem (its first two convs have 64).
        reduction: SE reduction ratio.
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier (0.2 in the reference).
        drop_path_rate: stochastic depth, linear in the block index as in ResNet.
        zero_init_last: zero-init the last norm scale of every residual branch.
        padding: padding mode of the convs and the stem pool (see
            :func:`layers.get_padding`); with ``'tf_same'`` the ceil-mode stem pool becomes
            a TF ``SAME`` pool, which agrees with it at even sizes and pads one pixel on both
            sides (one more output) at odd ones.
    """

    stage_sizes: tuple[int, ...] = (3, 8, 36, 3)
    groups: int = 64
    stem_width: int = 128
    reduction: int = 16
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images.

        Args:
            x: images, (B, H, W, C).
            train: batch statistics, dropout and drop-path on.
            return_features: also return ``{'stem', 'stage1'..'stage4', 'pre_logits'}``.

        Returns:
            float32 logits (B, num_classes) (pooled features when ``num_classes == 0``),
            and the feature dict when ``return_features``.
        """
        if self.norm not in ('batch', 'group'):
            raise ValueError(f"SENet norm must be 'batch' or 'group', got {self.norm!r}")
        if len(self.stage_sizes) != 4:
            raise ValueError('SENet has four stages')
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}

        x = x.astype(self.dtype)
        for i, (width, stride) in enumerate(((64, 2), (64, 1), (self.stem_width, 1)), start=1):
            x = conv(width, 3, stride, name=f'layer0_conv{i}')(x)
            x = nn.relu(norm(name=f'layer0_bn{i}')(x))
        if self.padding == 'tf_same':
            pads = 'SAME'
        else:
            pads = [_ceil_pool_padding(n, 3, 2) for n in x.shape[1:3]]
        x = nn.max_pool(x, (3, 3), (2, 2), padding=pads)
        features['stem'] = x

        n_blocks = sum(self.stage_sizes)
        index = 0
        for stage, size in enumerate(self.stage_sizes):
            for b in range(size):
                x = SEBottleneck(
                    planes=64 * 2**stage,
                    strides=2 if stage > 0 and b == 0 else 1,
                    groups=self.groups,
                    down_kernel=1 if stage == 0 else 3,
                    conv=conv,
                    norm=norm,
                    drop_path_rate=self.drop_path_rate * index / max(n_blocks - 1, 1),
                    zero_init_last=self.zero_init_last,
                    reduction=self.reduction,
                    dtype=self.dtype,
                    name=f'layer{stage + 1}_{b}',
                )(x, train)
                index += 1
            features[f'stage{stage + 1}'] = x

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype,
                name='last_linear',
            )
        return (x, features) if return_features else x


# timm legacy SENet state-dict names <-> ours (norm names kept for GroupNorm too).
register_name_map(
    'senet',
    (
        NameRule('layer0.conv{i}', 'layer0_conv{i}', 'conv'),
        NameRule('layer0.bn{i}', 'layer0_bn{i}', 'norm'),
        NameRule('layer{s}.{b}.conv{i}', 'layer{s}_{b}/conv{i}', 'conv'),
        NameRule('layer{s}.{b}.bn{i}', 'layer{s}_{b}/bn{i}', 'norm'),
        NameRule('layer{s}.{b}.se_module.fc{i}', 'layer{s}_{b}/se_module/fc{i}', 'conv'),
        NameRule('layer{s}.{b}.downsample.0', 'layer{s}_{b}/downsample_conv', 'conv'),
        NameRule('layer{s}.{b}.downsample.1', 'layer{s}_{b}/downsample_bn', 'norm'),
        NameRule('last_linear', 'last_linear', 'linear'),
    ),
)


def _senet(variant: str, **kwargs) -> SENet:
    stage_sizes, groups, stem_width = SENET_VARIANTS[variant]
    return SENet(**{'stage_sizes': stage_sizes, 'groups': groups, 'stem_width': stem_width, **kwargs})


# Data settings: timm's legacy_senet154.in1k cfg (224 px, bilinear, crop 0.875). top1: the
# paper's single 224-crop result, 100 - 18.68 (Hu et al. 2018, Table 8).
@register_model(top1=81.32, paper=_PAPER)
def legacy_senet154(**kwargs) -> SENet:
    """SENet-154 (legacy Caffe layout), 115,088,984 parameters (timm)."""
    return _senet('senet154', **kwargs)
