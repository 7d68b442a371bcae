"""MnasNet-B1 as in torchvision and MnasNet-A1 (with squeeze-excite) as in timm.

Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", CVPR 2019.
Both are stacks of mobile inverted bottlenecks built by :class:`models.mobilenet.MobileNet`
from the block tables below:

* ``mnasnet0_5`` / ``0_75`` / ``1_0`` / ``1_3``: torchvision's MNASNet (the B1 search
  result, without SE; paper Fig. 7 / Table 1 footnote) at depth multipliers 0.5-1.3 with
  torchvision's rounding (nearest multiple of 8, up if rounding lost > 10%), ReLU, a fixed
  1280-wide head and BatchNorm momentum 0.0003 (torch) = 0.9997 (flax), eps 1e-5, as the
  paper's TensorFlow setup. Parameters 2,218,512 / 3,170,208 / 4,383,312 / 6,282,256, equal
  to torchvision; variable names follow torchvision's flat ``layers.K``.
* ``semnasnet_100``: timm's MnasNet-A1 (paper Fig. 7(a)): SE (ratio 0.25 of the block
  input, sigmoid gate) in the 40/112/160-channel stages; 3,887,038 parameters, equal to
  timm; timm names (``conv_stem``, ``blocks.S.B``).
"""

from __future__ import annotations

import functools
from typing import Any

from models import registry
from models.convert import NameRule, register_name_map
from models.mobilenet import TIMM_RULES, Arch, Block, Layout, MobileNet

# torchvision's names; semnasnet_100 (timm's) overrides them.
register_model = functools.partial(
    registry.register_model, family='mnasnet', classifier='classifier_1', first_conv='layers_0'
)

_PAPER = 'Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", CVPR 2019'

# torchvision's MNASNet (B1): depths 32 (stem), 16, 24, 40, 80, 96, 192, 320.
MNASNET_B1: Arch = (
    (Block('ds', 1, 3, 1, 1, 16, skip=False),),
    (Block('ir', 3, 3, 2, 3, 24),),
    (Block('ir', 3, 5, 2, 3, 40),),
    (Block('ir', 3, 5, 2, 6, 80),),
    (Block('ir', 2, 3, 1, 6, 96),),
    (Block('ir', 4, 5, 2, 6, 192),),
    (Block('ir', 1, 3, 1, 6, 320),),
)

# MnasNet-A1 (Tan et al. 2019, Fig. 7(a)), as timm's semnasnet.
MNASNET_A1: Arch = (
    (Block('ds', 1, 3, 1, 1, 16, skip=False),),
    (Block('ir', 2, 3, 2, 6, 24),),
    (Block('ir', 3, 5, 2, 3, 40, se=0.25),),
    (Block('ir', 4, 3, 2, 6, 80),),
    (Block('ir', 2, 3, 1, 6, 112, se=0.25),),
    (Block('ir', 3, 5, 2, 6, 160, se=0.25),),
    (Block('ir', 1, 3, 1, 6, 320),),
)


def _torchvision_block(stage: int, index: int, flat: int) -> str:
    del flat
    # layers.3-7 are the depthwise-separable first block; layers.8-13 the six stacks.
    return 'layers_3' if stage == 0 else f'layers_{7 + stage}_{index}'


# torchvision MNASNet: layers.0/1 stem conv/BN, layers.14/15 head conv/BN, classifier.1.
TORCHVISION_LAYOUT = Layout('layers_0', 'layers_1', _torchvision_block, 'layers_14', 'layers_15', 'classifier_1')

register_name_map(
    'mnasnet',
    TIMM_RULES
    + (
        NameRule('layers.0', 'layers_0', 'conv'),
        NameRule('layers.1', 'layers_1', 'norm'),
        NameRule('layers.3', 'layers_3/conv_dw', 'conv'),
        NameRule('layers.4', 'layers_3/bn1', 'norm'),
        NameRule('layers.6', 'layers_3/conv_pw', 'conv'),
        NameRule('layers.7', 'layers_3/bn2', 'norm'),
        NameRule('layers.{k}.{b}.layers.0', 'layers_{k}_{b}/conv_pw', 'conv'),
        NameRule('layers.{k}.{b}.layers.1', 'layers_{k}_{b}/bn1', 'norm'),
        NameRule('layers.{k}.{b}.layers.3', 'layers_{k}_{b}/conv_dw', 'conv'),
        NameRule('layers.{k}.{b}.layers.4', 'layers_{k}_{b}/bn2', 'norm'),
        NameRule('layers.{k}.{b}.layers.6', 'layers_{k}_{b}/conv_pwl', 'conv'),
        NameRule('layers.{k}.{b}.layers.7', 'layers_{k}_{b}/bn3', 'norm'),
        NameRule('layers.14', 'layers_14', 'conv'),
        NameRule('layers.15', 'layers_15', 'norm'),
        NameRule('classifier.1', 'classifier_1', 'linear'),
    ),
)


def _torchvision_mnasnet(alpha: float) -> dict[str, Any]:
    # BatchNorm momentum: torchvision's 1 - 0.9997, the paper's TF value.
    return dict(arch=MNASNET_B1, width=alpha, act='relu', layout=TORCHVISION_LAYOUT, bn_momentum=0.9997, drop_rate=0.2)


# Registered name -> (MobileNet fields, ModelCfg fields); parameter counts in the README
# table. top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256 bilinear); for
# semnasnet_100, timm's data cfg of semnasnet_100.rmsp_in1k (bicubic, crop 0.875) and the
# paper's Table 1 (MnasNet-A1, 75.2%), with timm's names.
MNASNET_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    'mnasnet0_5': (_torchvision_mnasnet(0.5), dict(top1=67.734)),
    'mnasnet0_75': (_torchvision_mnasnet(0.75), dict(top1=71.180, crop_pct=224 / 232)),
    'mnasnet1_0': (_torchvision_mnasnet(1.0), dict(top1=73.456)),
    'mnasnet1_3': (_torchvision_mnasnet(1.3), dict(top1=76.506, crop_pct=224 / 232)),
    'semnasnet_100': (
        dict(arch=MNASNET_A1, act='relu'),
        dict(top1=75.2, interpolation='bicubic', classifier='classifier', first_conv='conv_stem'),
    ),
}

for _name, (_fields, _cfg) in MNASNET_MODELS.items():
    register_model(name=_name, paper=_PAPER, **_cfg)(functools.partial(MobileNet, **_fields))
