"""Tests of Xception (models/xception.py), ShuffleNet v1/v2 (models/shufflenet.py) and
NASNet-A (models/nasnet.py).

Parameter counts against timm/torchvision (hard-coded below, with their source) or, with no
reference, the papers' tables; logits parity with converted random-init reference weights;
forward/backward in both norm modes; feature shapes. CPU time is kept small (the machine is
shared): full-resolution parity only for ShuffleNet v2 1.0x (224 px), every other parity
check at a small odd resolution and batch 1 (nasnetalarge's and the NASNet train step,
~50 CPU-seconds together, are marked ``slow``), and the train-step tests on shallow instances
of each family (module fields ``blocks`` / ``stage_repeats`` / ``cells_per_stage``) built
by the same code as the registered networks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
from models import nasnet, shufflenet, xception
from tools import model_table

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from modeltest import num_params  # noqa: E402
from parity import assert_logits_match  # noqa: E402

# sum(p.numel() for p in m.parameters()), torch 2.14 / torchvision 0.29.1 / timm 1.0.29:
# timm.create_model(name) for the Xceptions and nasnetalarge, torchvision.models.<name>()
# for ShuffleNet v2 (equal to torchvision's documented num_params).
REFERENCE_PARAMS = {
    "legacy_xception": 22_855_952,
    "xception41": 26_969_560,
    "xception65": 39_916_312,
    "xception71": 42_338_736,
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
    "shufflenet_v2_x1_5": 3_503_624,
    "shufflenet_v2_x2_0": 7_393_996,
    "nasnetalarge": 88_753_150,
}

# Zhang et al. 2018, Table 1 "Complexity" (MFLOPs = multiply-adds at 224 px), 1.0x.
SHUFFLENET_V1_MFLOPS = {1: 143, 2: 140, 3: 137, 4: 133, 8: 137}


def _abstract_variables(model, size, batch=1):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False)
    )


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_matches_reference(name):
    variables = _abstract_variables(models.create_model(name), 75)
    assert num_params(variables["params"]) == REFERENCE_PARAMS[name]


def test_nasnet_feature_shapes():
    # Shapes of the shallow test instance (the full nets' are traced in the parity and
    # Table 2 tests): stem cells stride 8, stacks at stride 8 / 16 / 32.
    model = models.create_model("nasnetamobile", num_classes=0, **SHALLOW["nasnetamobile"])
    variables = _abstract_variables(model, 64)
    pooled, feats = jax.eval_shape(
        functools.partial(model.apply, train=False, return_features=True),
        variables,
        jnp.zeros((1, 64, 64, 3)),
    )
    f = 384 // 24
    assert pooled.shape == (1, 3 * 4 * f)
    assert {k: v.shape for k, v in feats.items()} == {
        "stem": (1, 8, 8, 2 * (f // 2)),
        "stage1": (1, 8, 8, 3 * f),
        "stage2": (1, 4, 4, 3 * 2 * f),
        "stage3": (1, 2, 2, 3 * 4 * f),
        "pre_logits": (1, 3 * 4 * f),
    }


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


# ------------------------------------------------------------------- train step, features

# Shallow instances (same classes and code paths as the registered networks). The NASNet
# one also swaps in a two-combination cell pair (data, interpreted by the same Cell): the
# full NASNet-A cells' backward pass takes ~1 CPU-minute to compile, and their forward pass
# is covered op for op by the nasnetalarge parity test.
_TINY_NORMAL = nasnet.CellSpec(
    combs=((("sep3", 1), ("id", 0)), (("avg3", 0), ("sep5", 2))), concat=(0, 2, 3), reduction=False
)
_TINY_REDUCTION = nasnet.CellSpec(
    combs=((("sep3", 1), ("sep5", 0)), (("max3", 1), ("id", 2))), concat=(2, 3), reduction=True
)
SHALLOW = {
    "xception65": dict(
        blocks=(
            xception.AlignedBlock(64, (32, 32, 64), 2),
            xception.AlignedBlock(64, (64, 64, 64)),
            xception.AlignedBlock(64, (64, 64, 128), no_skip=True, start_with_relu=False),
        )
    ),
    "shufflenet_v1_g3": dict(stage_repeats=(2, 1, 1)),
    "shufflenet_v2_x0_5": dict(stage_repeats=(2, 1, 1)),
    "nasnetamobile": dict(
        cells_per_stage=1,
        penultimate_filters=384,
        stem_filters=16,
        normal_cell=_TINY_NORMAL,
        reduction_cell=_TINY_REDUCTION,
    ),
}
TWINS = [
    ("xception65", "group"),
    ("shufflenet_v1_g3", "group"),
    # ~25 CPU-seconds of compilation (NASNet cells' GN + WS backward): marked slow.
    pytest.param("nasnetamobile", "group", marks=pytest.mark.slow),
    ("shufflenet_v2_x0_5", "batch"),
]


@pytest.mark.parametrize("name, norm", TWINS)
def test_train_step(name, norm):
    extra = {"drop_path_rate": 0.2} if name != "shufflenet_v2_x0_5" else {}
    model = models.create_model(
        name,
        num_classes=5,
        norm=norm,
        weight_std=norm == "group",
        drop_rate=0.2,
        **extra,
        **SHALLOW[name],
    )
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    if norm == "group":
        assert set(variables) == {"params"}
    labels = jnp.array([1, 3])

    def loss_fn(params, state):
        logits, new_state = model.apply(
            {"params": params, **state},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    state = {k: v for k, v in variables.items() if k != "params"}
    (loss, new_state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], state
    )
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if norm == "batch":
        changed = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)), state["batch_stats"], new_state["batch_stats"]
        )
        assert all(jax.tree.leaves(changed))


FEATURES = {
    "legacy_xception": (
        299,
        {
            "stem": (147, 64),
            "stage1": (74, 128),
            "stage2": (37, 256),
            "stage3": (19, 728),
            "stage4": (10, 2048),
        },
    ),
    "shufflenet_v2_x1_0": (
        224,
        {"stem": (56, 24), "stage1": (28, 116), "stage2": (14, 232), "stage3": (7, 464)},
    ),
}
PRE_LOGITS = {
    "legacy_xception": 2048,
    "xception65": 2048,
    "shufflenet_v2_x1_0": 1024,
    "shufflenet_v1_g8": 1536,
    "nasnetalarge": 4032,
    "nasnetamobile": 1056,
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features_and_headless(name):
    """Shapes only (eval_shape: no compilation) at the default resolution."""
    size, expected = FEATURES[name]
    model = models.create_model(name)
    variables = _abstract_variables(model, size)
    logits, feats = jax.eval_shape(
        functools.partial(model.apply, train=False, return_features=True),
        variables,
        jnp.zeros((1, size, size, 3)),
    )
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        **{k: (1, s, s, c) for k, (s, c) in expected.items()},
        "pre_logits": (1, PRE_LOGITS[name]),
    }
    headless = models.create_model(name, num_classes=0)
    pooled = jax.eval_shape(
        functools.partial(headless.apply, train=False),
        _abstract_variables(headless, size),
        jnp.zeros((1, size, size, 3)),
    )
    assert pooled.shape == (1, PRE_LOGITS[name])


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.create_model("shufflenet_v2_x0_5", dtype=jnp.bfloat16)
    variables = _abstract_variables(model, 64)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits = jax.eval_shape(
        functools.partial(model.apply, train=False), variables, jnp.zeros((1, 64, 64, 3))
    )
    assert logits.dtype == jnp.float32
