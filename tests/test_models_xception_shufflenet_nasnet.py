"""Tests of Xception (models/xception.py), ShuffleNet v1/v2 (models/shufflenet.py) and
NASNet-A (models/nasnet.py).

With no reference, the papers' tables (NASNet-A mobile's Table 2, ShuffleNet v1's Table 1);
the cells as data; logits parity with converted random-init reference weights. CPU time is
kept small (the machine is shared): full-resolution parity only for ShuffleNet v2 1.0x
(224 px), every other parity check at a small odd resolution and batch 1 (nasnetalarge's,
~30 CPU-seconds, is marked ``slow``). Counts (equal to timm 1.0.29's / torchvision
0.29.1's), shapes, twins and train steps of every model: tests/test_models_registry.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import nasnet, shufflenet
from tools import model_table

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from parity import assert_logits_match  # noqa: E402

# Zhang et al. 2018, Table 1 "Complexity" (MFLOPs = multiply-adds at 224 px), 1.0x.
SHUFFLENET_V1_MFLOPS = {1: 143, 2: 140, 3: 137, 4: 133, 8: 137}


def _abstract_variables(model, size, batch=1):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False)
    )


def test_nasnetamobile_matches_paper_table2():
    # Zoph et al. 2018, Table 2: NASNet-A (4 @ 1056), 5.3M parameters, 564M mult-adds.
    stats = model_table.model_stats("nasnetamobile")
    assert stats["params"] == 5_289_978
    assert abs(stats["params"] / 5.3e6 - 1) < 0.01
    assert abs(stats["macs"] / 564e6 - 1) < 0.01


def test_shufflenet_v1_matches_paper_table1():
    # The table's figures are rounded and evidently count the convolutions only: without
    # the classifier (C x 1000 MACs) every variant is within 0.5%, with it within 1.1%.
    for g, mflops in SHUFFLENET_V1_MFLOPS.items():
        stats = model_table.model_stats(f"shufflenet_v1_g{g}")
        conv_macs = stats["macs"] - shufflenet.V1_WIDTHS[g][-1] * 1000
        assert abs(conv_macs / (mflops * 1e6) - 1) < 0.005, (g, stats["macs"])
        assert abs(stats["macs"] / (mflops * 1e6) - 1) < 0.011, (g, stats["macs"])
    # Table 1's stage widths, and the grouped 1x1 convs' shapes (first unit of stage 2 is
    # ungrouped, Sec. 3.3).
    variables = _abstract_variables(models.create_model("shufflenet_v1_g3", num_classes=0), 64)[
        "params"
    ]
    assert variables["stage2_0"]["conv1"]["kernel"].shape == (1, 1, 24, 60)
    assert variables["stage2_0"]["conv3"]["kernel"].shape == (1, 1, 20, 240 - 24)
    assert variables["stage3_1"]["conv1"]["kernel"].shape == (1, 1, 160, 120)
    assert variables["stage4_3"]["conv3"]["kernel"].shape == (1, 1, 80, 960)


def test_channel_shuffle_matches_torch_view_transpose():
    x = np.arange(2 * 12, dtype=np.float32).reshape(2, 1, 1, 12)
    expected = torch.from_numpy(x[:, 0, 0]).view(2, 3, 4).transpose(1, 2).reshape(2, 12).numpy()
    np.testing.assert_array_equal(
        np.asarray(shufflenet.channel_shuffle(jnp.asarray(x), 3))[:, 0, 0], expected
    )


def test_nasnet_cells_are_data():
    # Fig. 4: the normal cell concatenates its input before last and all five combinations;
    # the reduction cell only the combinations; both use 5 combinations of 2 ops.
    for spec in (nasnet.NASNET_A_NORMAL, nasnet.NASNET_A_REDUCTION):
        assert len(spec.combs) == 5
        assert all(op in nasnet.OPS for pair in spec.combs for op, _ in pair)
    assert nasnet.NASNET_A_NORMAL.concat == (0, 2, 3, 4, 5, 6)
    assert nasnet.NASNET_A_REDUCTION.concat == (3, 4, 5, 6)


# ------------------------------------------------------------------------------- parity


PARITY = [
    ("shufflenet_v2_x1_0", lambda: torchvision.models.shufflenet_v2_x1_0(), 224),
    ("shufflenet_v2_x1_0", lambda: torchvision.models.shufflenet_v2_x1_0(), 193),
    ("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(), 64),
    ("legacy_xception", lambda: timm.create_model("legacy_xception"), 73),
    ("xception65", lambda: timm.create_model("xception65"), 64),
    # 43 px: odd sizes at every level (21, 11, 6, 3, 2), exercising TF-SAME padding and
    # the shifted factorised-reduction path.
    pytest.param(
        "nasnetalarge", lambda: timm.create_model("nasnetalarge"), 43, marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(
    "name, make, resolution",
    PARITY,
    ids=[
        f"{p.values[0]}-{p.values[2]}" if hasattr(p, "values") else f"{p[0]}-{p[2]}" for p in PARITY
    ],
)
def test_logits_match_reference(name, make, resolution):
    torch.manual_seed(0)
    assert_logits_match(name, make(), resolution=resolution, batch=1)
