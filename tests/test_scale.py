"""Scale-out on paper: the convolution implementations, what a sharded step moves, batch
arithmetic on any device count, and the accelerator programs exported from a CPU.

Checks that need 8 devices compile for 8 fake CPU devices in a fresh interpreter
(`run_python`): the device count is fixed when JAX starts, and this session has one.
Nothing there runs a step; the programs are compiled (or only lowered) from abstract shapes.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, REPO, read_jsonl, run_train

import models
from models import layers
from trainers import core


def run_python(code: str, *, devices: int = 8, timeout: int = 600) -> dict:
    """Runs `code` in a fresh interpreter with `devices` fake CPU devices; the code prints
    one JSON object as its last line, which is returned."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               XLA_FLAGS=f'{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}',
               PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, 'tests'))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- depthwise


def _native_depthwise(x, w, strides, padding, dilation):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


@pytest.mark.parametrize('kernel,stride,mode,dilation,multiplier', [
    (3, 1, 'symmetric', 1, 1),
    (3, 2, 'symmetric', 1, 1),
    (3, 2, 'tf_same', 1, 1),
    (5, 1, 'tf_same', 1, 1),
    (5, 2, 'symmetric', 1, 2),   # channel multiplier (O = 2 C)
    (7, 1, 'symmetric', 1, 1),
    (7, 2, 'tf_same', 1, 1),
    (3, 1, 'symmetric', 2, 1),   # dilation (Xception-65/71 style atrous separable convs)
    (3, 1, 'valid', 1, 1),
    (1, 2, 'symmetric', 1, 1),   # a stride phase no tap reaches: its input gradient is zero
    (3, 3, 'tf_same', 1, 1),     # three phases per axis, 13 and 12 not multiples of 3
    (5, 2, 'tf_same', 2, 1),     # stride and dilation together
])
def test_shifted_depthwise_equals_native_forward_and_backward(kernel, stride, mode, dilation,
                                                              multiplier):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 13, 12, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6 * multiplier)), jnp.float32)
    padding = layers.get_padding(mode, kernel, stride, dilation)
    s, d = (stride, stride), (dilation, dilation)

    def both(x, w):
        def loss(f):
            return lambda x, w: jnp.sum(jnp.sin(f(x, w)))
        native = lambda x, w: _native_depthwise(x, w, s, padding, d)  # noqa: E731
        shifted = lambda x, w: layers.depthwise_conv_shifted(x, w, s, padding, d)  # noqa: E731
        return (native(x, w), shifted(x, w),
                jax.grad(loss(native), (0, 1))(x, w), jax.grad(loss(shifted), (0, 1))(x, w))

    y_native, y_shifted, g_native, g_shifted = jax.jit(both)(x, w)
    assert y_native.shape == y_shifted.shape
    # Float32 sums in another order: equal to a few ulps of the largest term.
    for a, b in zip((y_shifted, *g_shifted), (y_native, *g_native), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(np.abs(b).max()))


def test_shifted_depthwise_in_bfloat16_accumulates_in_float32_and_keeps_dtypes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 5, 5, 8)), jnp.bfloat16)
    s, padding = (2, 2), [(1, 1), (1, 1)]

    def vjp(f, x, w):
        y, back = jax.vjp(lambda x, w: f(x, w, s, padding, (1, 1)), x, w)
        return (y, *back(g.astype(y.dtype)))

    got = jax.jit(lambda x, w: vjp(layers.depthwise_conv_shifted, x, w))(x, w)
    want = vjp(_native_depthwise, x.astype(jnp.float32), w.astype(jnp.float32))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.bfloat16
        # One bfloat16 rounding of a float32-accumulated result: 2^-8 relative.
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2 ** -8,
                                   atol=2 ** -8 * float(np.abs(b).max()))


def _conv_ops(text: str) -> list[str]:
    return re.findall(r'stablehlo\.convolution[^\n]*', text)


def test_depthwise_auto_is_shifted_on_cpu_and_native_for_accelerators():
    model = models.create_model('mobilenet_v2', num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    grouped = lambda ops: [op for op in ops if 'feature_group_count = 1 ' not in op  # noqa: E731
                           and 'feature_group_count = 1,' not in op]
    cpu = _conv_ops(apply.lower(variables, x).as_text())
    assert cpu and not grouped(cpu)  # only the dense 1x1 / stem convolutions stay convolutions
    exported = jax.export.export(apply, platforms=['tpu'])(variables, x)
    assert len(grouped(_conv_ops(exported.mlir_module()))) == 17  # MobileNetV2's depthwise layers
    # For two platforms at once each gets its branch, both with the native convolution.
    exported = jax.export.export(apply, platforms=['cuda', 'tpu'])(variables, x)
    assert len(grouped(_conv_ops(exported.mlir_module()))) == 2 * 17
    with layers.depthwise_implementation('native'):
        forced = _conv_ops(jax.jit(lambda v, x: model.apply(v, x, train=False))
                           .lower(variables, x).as_text())
    assert len(grouped(forced)) == 17
    with pytest.raises(ValueError, match='auto'):
        layers.depthwise_implementation('fast').__enter__()


def test_mobilenet_logits_equal_with_either_depthwise_implementation():
    model = models.create_model('mobilenet_v2', num_classes=10)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    auto = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with layers.depthwise_implementation('native'):
        native = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(auto, native, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- batchnorm


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batchnorm_train_pass_equals_flax_values_statistics_and_gradients(dtype):
    from models.batchnorm import BatchNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 5, 6, 7)) * 3 + 1, dtype)
    gy = jnp.asarray(rng.standard_normal(x.shape), dtype)
    g_mean, g_var = (jnp.asarray(rng.standard_normal(7), jnp.float32) for _ in range(2))
    ours, flax_bn = (m(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
                     for m in (BatchNorm, nn.BatchNorm))
    init = ours.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a, b: (a.shape, a.dtype, bool((a == b).all())), init,
                        flax_bn.init(jax.random.key(0), x)) == jax.tree.map(
        lambda a: (a.shape, a.dtype, True), init)
    params = {'scale': jnp.linspace(0.5, 2.0, 7), 'bias': jnp.linspace(-1.0, 1.0, 7)}
    stats = {'mean': jnp.linspace(-0.1, 0.1, 7), 'var': jnp.linspace(0.9, 1.1, 7)}

    def run(module):
        # A loss of the output and of the updated running statistics, so the gradient
        # through the batch statistics is checked too.
        def loss(params, x):
            y, updates = module.apply({'params': params, 'batch_stats': stats}, x,
                                      mutable=['batch_stats'])
            new = updates['batch_stats']
            return (jnp.vdot(y.astype(jnp.float32), gy.astype(jnp.float32))
                    + jnp.vdot(new['mean'], g_mean) + jnp.vdot(new['var'], g_var)), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        return y, new, grads

    got, want = jax.jit(lambda: run(ours))(), jax.jit(lambda: run(flax_bn))()
    tol = 2e-6 if dtype == jnp.float32 else 2 ** -8  # float32 sums; one bfloat16 rounding
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))
    # Eval mode is Flax's own code: bitwise equal.
    evaluate = lambda m: np.asarray(m(use_running_average=True, dtype=dtype).apply(  # noqa: E731
        {'params': params, 'batch_stats': stats}, x), np.float32)
    np.testing.assert_array_equal(evaluate(BatchNorm), evaluate(nn.BatchNorm))


@pytest.mark.parametrize('kwargs', [{'use_bias': False}, {'axis': 1}, {'use_fast_variance': False}])
def test_batchnorm_cases_outside_the_written_out_pass_are_flaxs_own(kwargs):
    from models.batchnorm import BatchNorm

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5)), jnp.float32)
    ours, theirs = (m(use_running_average=False, dtype=jnp.float32, **kwargs)
                    for m in (BatchNorm, nn.BatchNorm))
    variables = theirs.init(jax.random.key(0), x)

    def run(module, x):
        return module.apply(variables, x, mutable=['batch_stats'])

    assert 'batch_norm_train' not in str(jax.make_jaxpr(lambda x: run(ours, x))(x))
    for a, b in zip(jax.tree.leaves(run(ours, x)), jax.tree.leaves(run(theirs, x)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_batchnorm_model_uses_the_written_out_train_pass():
    model = models.create_model('resnet18', num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
        variables, x))
    layers_with_stats = len(variables['batch_stats'] and jax.tree.leaves(variables['batch_stats'])) // 2
    assert layers_with_stats == 20
    assert jaxpr.count('batch_norm_train') == layers_with_stats


def test_swish_recomputing_its_sigmoid_equals_autodiff():
    from models.mobilenet import ACTIVATIONS, swish

    assert ACTIVATIONS['swish'] is swish
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 601), jnp.array([-1e4, 1e4, 0.0])])
    np.testing.assert_array_equal(swish(x), nn.swish(x))
    g = jnp.cos(x)
    ours, theirs = (jax.vjp(f, x)[1](g)[0] for f in (swish, nn.swish))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert np.isfinite(ours).all()


# ----------------------------------------------------------------------------- dense (im2col)


@pytest.mark.parametrize('kernel,stride,mode,dilation', [
    ((1, 1), 1, 'symmetric', 1),
    ((1, 1), 2, 'symmetric', 1),   # ResNet's strided 1x1 downsample
    ((3, 3), 1, 'symmetric', 1),
    ((3, 3), 2, 'symmetric', 1),
    ((3, 3), 2, 'tf_same', 1),
    ((5, 5), 1, 'tf_same', 1),
    ((7, 7), 2, 'symmetric', 1),   # stems
    ((1, 7), 1, 'symmetric', 1),   # Inception's factorised 1x7 / 7x1
    ((7, 1), 1, 'symmetric', 1),
    ((3, 3), 1, 'symmetric', 2),   # dilation
    ((3, 3), 1, 'valid', 1),
    ((11, 11), 4, 'valid', 1),     # AlexNet's stem
])
def test_im2col_equals_native_forward_and_backward(kernel, stride, mode, dilation):
    """Output, input gradient and kernel gradient of im2col against XLA's convolution, both
    measured against a float64 reference: im2col sums the same products in another order,
    so it must be as close to the exact result as XLA's own convolution is."""
    rng = np.random.default_rng(sum(kernel) * 10 + stride)
    x64 = rng.standard_normal((2, 15, 14, 5))
    w64 = rng.standard_normal((*kernel, 5, 7))
    padding = layers.get_padding(mode, kernel, stride, dilation)
    s, d = (stride, stride), (dilation, dilation)

    def native(x, w):
        return jax.lax.conv_general_dilated(x, w, s, padding, rhs_dilation=d,
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def im2col(x, w):
        return layers.conv_im2col(x, w, s, padding, d)

    def value_and_grads(f, x, w):
        y = f(x, w)
        return (y, *jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w))

    x, w = jnp.asarray(x64, jnp.float32), jnp.asarray(w64, jnp.float32)
    got = jax.jit(lambda x, w: value_and_grads(im2col, x, w))(x, w)
    xla = jax.jit(lambda x, w: value_and_grads(native, x, w))(x, w)
    with jax.enable_x64(True):
        exact = [np.asarray(a) for a in jax.jit(lambda x, w: value_and_grads(native, x, w))(
            jnp.asarray(x64), jnp.asarray(w64))]
    for name, a, b, ref in zip(('output', 'input grad', 'kernel grad'), got, xla, exact, strict=True):
        assert a.shape == ref.shape, name
        err, xla_err = np.abs(np.asarray(a) - ref).max(), np.abs(np.asarray(b) - ref).max()
        scale = np.abs(ref).max()
        assert err <= 4 * xla_err + 1e-6 * scale, (name, err, xla_err)
        assert err <= 2e-5 * scale, (name, err, scale)


def test_im2col_of_a_window_larger_than_its_input_is_empty_like_xlas():
    """Inception-ResNet-v2's reductions at its smallest input see 1x1 and 2x2 maps."""
    for hw in (1, 2):
        x, w = jnp.ones((2, hw, hw, 4)), jnp.ones((3, 3, 4, 6))
        native = jax.lax.conv_general_dilated(x, w, (2, 2), 'VALID',
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        assert layers.conv_im2col(x, w, (2, 2), 'VALID').shape == native.shape


def test_dense_auto_is_im2col_on_cpu_and_native_for_accelerators():
    model = models.create_model('resnet18', num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def apply(v, x):
        return model.apply(v, x, train=False)

    with layers.dense_implementation('native'):
        convs = [e for e in jax.make_jaxpr(apply)(variables, x).eqns
                 if e.primitive.name == 'conv_general_dilated']
        native = _conv_ops(jax.jit(apply).lower(variables, x).as_text())
    assert len(convs) == len(native) == 20  # stem, 16 block convs, 3 downsamples
    wide = [layers.prefers_im2col(e.invars[0].aval.shape, e.invars[1].aval.shape,
                                  e.params['window_strides']) for e in convs]
    assert 0 < sum(wide) < 20  # the 1x1 downsamples go, the stem stays
    # The implementation is read when a function is traced: each check traces afresh.
    fresh = lambda: jax.jit(lambda v, x: apply(v, x))  # noqa: E731
    cpu = _conv_ops(fresh().lower(variables, x).as_text())
    assert len(cpu) == wide.count(False)
    for platforms in (['tpu'], ['cuda', 'tpu']):
        exported = jax.export.export(fresh(), platforms=platforms)(variables, x)
        assert len(_conv_ops(exported.mlir_module())) == 20 * len(platforms)
    with layers.dense_implementation('im2col'):
        assert not _conv_ops(fresh().lower(variables, x).as_text())
    with pytest.raises(ValueError, match='auto'):
        layers.dense_implementation('winograd').__enter__()


def test_resnet_train_step_equal_with_either_dense_implementation():
    """Loss, gradients and BatchNorm updates of a train-mode step with every dense
    convolution as im2col are as close to a float64 run as XLA's convolutions are."""
    model = models.create_model('resnet18', num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 3))
    labels = jnp.asarray(rng.integers(0, 10, 4))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)

    def run(dtype):
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
        compute = models.create_model('resnet18', num_classes=10, dtype=dtype)

        def step(params, images):
            logits, updates = compute.apply({**cast(variables), 'params': params}, images,
                                            train=True, mutable=['batch_stats'])
            return core.cross_entropy(logits, labels).mean(), updates

        out = jax.jit(jax.value_and_grad(step, has_aux=True))(cast(variables['params']),
                                                              jnp.asarray(x, dtype))
        return [np.asarray(a, np.float64) for a in jax.tree.leaves(out)]

    with layers.dense_implementation('im2col'):
        got = run(jnp.float32)
    with layers.dense_implementation('native'):
        xla = run(jnp.float32)
        with jax.enable_x64(True):
            exact = run(jnp.float64)
    worst = 0.0
    for a, b, ref in zip(got, xla, exact, strict=True):
        scale = np.abs(ref).max() + 1e-30
        err, xla_err = np.abs(a - ref).max() / scale, np.abs(b - ref).max() / scale
        worst = max(worst, err / max(xla_err, 1e-7))
        assert err < 1e-3, err  # BatchNorm over 4 values (layer4 at 1x1) amplifies rounding
    assert worst < 8, worst  # im2col's rounding is XLA's, within a small factor


# ----------------------------------------------------------------------------- grouped, 8 devices


def _grouped_outside_shard_map(jaxpr, inside=False) -> list[tuple[int, int]]:
    """(groups, channels) of each grouped, non-depthwise convolution not under shard_map."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            groups, channels = eqn.params['feature_group_count'], eqn.invars[0].aval.shape[-1]
            if 1 < groups < channels and not inside:
                found.append((groups, channels))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _grouped_outside_shard_map(sub, inside or eqn.primitive.name == 'shard_map')
    return found


def _families() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in models.list_models():
        family = models.get_model_family(name)
        out.setdefault('vgg' if family.startswith('vgg') else family, []).append(name)
    return out


@pytest.mark.parametrize('family', sorted(_families()))
def test_grouped_convolutions_run_under_shard_map_in_every_model(family):
    """Every registered model, traced (`model.init`, which runs the forward pass) under an
    abstract 8-way 'data' mesh: no grouped convolution is left for XLA's partitioner,
    which would gather the whole batch for it."""
    mesh = jax.sharding.AbstractMesh((8,), ('data',))
    offenders, grouped = {}, {}
    for name in _families()[family]:
        model = models.create_model(name, num_classes=10)
        size, channels = models.get_model_cfg(name).input_size[::2]
        for res in (32, 64, 128, size):
            try:
                with jax.sharding.use_abstract_mesh(mesh):
                    jaxpr = jax.make_jaxpr(lambda x, m=model: m.init(jax.random.key(0), x, train=False))(
                        jax.ShapeDtypeStruct((16, res, res, channels), jnp.float32))
                break
            except Exception:  # noqa: BLE001 - too small for this architecture: go larger
                continue
        left = _grouped_outside_shard_map(jaxpr.jaxpr)
        if left:
            offenders[name] = left
        grouped[name] = 'shard_map' in str(jaxpr)
    assert not offenders
    expected = {'alexnet': {'alexnet_original'}, 'resnet': {n for n in grouped if 'resnext' in n},
                'senet': {'legacy_senet154'}, 'nfnet': set(grouped), 'shufflenet':
                {n for n in grouped if '_v1_' in n and not n.endswith('g1')}}.get(family, set())
    assert {n for n, g in grouped.items() if g} == expected


SCALE_CODE = '''
import json, jax
from tools import scale_check
out = {}
for name, res, shard in %s:
    step, state, batch = scale_check.abstract_step(name, devices=8, batch=64, resolution=res,
                                                   shard_params=shard)
    compiled = step.lower(state, batch).compile()
    moves = scale_check.batch_collectives(compiled.as_text(), 64)
    one = scale_check.abstract_step(name, devices=1, batch=64, resolution=res)
    flops1 = scale_check.per_device_flops(one[0].lower(one[1], one[2]).compile())
    out[f'{name}/{shard}'] = dict(moves=len(moves), ratio=scale_check.per_device_flops(compiled) / flops1)
print(json.dumps(out))
'''


def test_grouped_models_move_no_feature_maps_and_split_flops_on_8_devices():
    """The issue's worst cases (gathers before this change: alexnet_original 6,
    resnext50_32x4d 32) compiled for 8 devices: no collective moves a feature map of the
    global batch, with and without FSDP, and each device does ~1/8 of the 1-device FLOPs.
    (Per-parameter work, like the update of AlexNet's 61M parameters, does not shrink with
    the per-device batch; at a global batch of 64 it is a few percent of the step.)"""
    cases = [('alexnet_original', 80, True), ('shufflenet_v1_g3', 32, True),
             ('resnext50_32x4d', 32, False)]
    out = run_python(SCALE_CODE % repr(cases))
    for key, r in out.items():
        assert r['moves'] == 0, (key, r)
        assert abs(r['ratio'] * 8 - 1) < 0.1, (key, r)


def test_batch_collective_detector_sees_the_gathers_shard_map_removes():
    """Control: alexnet_original without the mesh context (grouped convolution left to
    the partitioner) shows the batch all-gathers the detector is looking for."""
    code = '''
    import json, jax
    from models import layers
    from tools import scale_check
    layers._data_axis_size = lambda batch: 1  # the state before this change
    step, state, batch = scale_check.abstract_step('alexnet_original', devices=8, batch=16, resolution=80)
    print(json.dumps({'moves': len(scale_check.batch_collectives(step.lower(state, batch).compile().as_text(), 16))}))
    '''
    assert run_python(code)['moves'] > 0


# ----------------------------------------------------------------------------- batch arithmetic


def test_eval_batch_is_padded_to_a_multiple_of_the_devices():
    assert core.eval_batch_size(500, 8, 1) == 504
    assert core.eval_batch_size(500, 3, 1) == 501
    assert core.eval_batch_size(300, 4, 2) == 300
    assert core.eval_batch_size(1, 64, 8) == 64
    core.check_batch_size('batch_size', 128, 8, 2)
    with pytest.raises(ValueError, match=r'batch_size=50 .*\(8\).*use 48 or 56'):
        core.check_batch_size('batch_size', 50, 8, 1)
    with pytest.raises(ValueError, match='positive'):
        core.check_batch_size('batch_size', 0, 1, 1)


def _shipped_configs():
    paths = sorted(glob.glob(os.path.join(REPO, 'configs', '**', '*.py'), recursive=True))
    for path in paths:
        module_name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        module = importlib.import_module(module_name)
        if hasattr(module, 'get_config'):
            yield module_name, module.get_config()


def _train_batches(config) -> dict[str, int]:
    batches = {'batch_size': config.batch_size}
    ratio = config.get('unlabeled_ratio') or config.get('noisy_student', {}).get('unlabeled_ratio')
    if ratio:
        batches['unlabeled_ratio * batch_size'] = int(round(ratio * config.batch_size))
    return batches


@pytest.mark.parametrize('devices', [1, 2, 3, 4, 8, 16, 64])
def test_every_shipped_config_batch_arithmetic(devices):
    """Every config evaluates on any device count (padded eval batch); a train batch either
    splits evenly or is refused naming sizes that do. The ImageNet-scale recipes split on
    every power-of-two count up to 64 devices."""
    for name, config in _shipped_configs():
        eval_batch = config.get('eval_batch_size') or config.batch_size
        padded = core.eval_batch_size(eval_batch, devices, 1)
        assert padded % devices == 0 and eval_batch <= padded < eval_batch + devices
        for key, b in _train_batches(config).items():
            if b % devices == 0:
                core.check_batch_size(key, b, devices, 1)
                continue
            with pytest.raises(ValueError) as info:
                core.check_batch_size(key, b, devices, 1)
            nearby = [int(n) for n in re.findall(r'use (\d+)(?: or (\d+))?', str(info.value))[0] if n]
            assert nearby and all(n % devices == 0 for n in nearby), (name, str(info.value))
            assert b < 256 or devices == 3, f'{name}: {key}={b} does not split over {devices} devices'


def test_default_config_trains_and_evaluates_on_8_devices(data_dir, tmp_path):
    """configs/default.py (eval_batch_size=500, which 8 does not divide) on 8 devices."""
    workdir = str(tmp_path / 'run')
    run_train([
        '--config', os.path.join(REPO, 'configs', 'default.py'), '--workdir', workdir,
        f'--config.data.data_dir={data_dir}', '--config.num_train_steps=6',
        '--config.eval_every_steps=6', '--config.log_every_steps=3',
        '--config.checkpoint_every_steps=6',
    ], devices=8)
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    assert results['num_examples'] == 1000
    assert [r['step'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if r['split'] == 'train'] == [3, 6]


# ----------------------------------------------------------------------------- exported for accelerators


EXPORT_CODE = '''
import json, re
import jax, jax.numpy as jnp, numpy as np
import models
from tools import scale_check
from trainers import core
out = {}
for name, res, kwargs in %s:
    step, state, batch = scale_check.abstract_step(name, devices=8, batch=16, resolution=res,
                                                   shard_params=True, dtype='bfloat16',
                                                   model_kwargs=kwargs)
    with jax.set_mesh(step.mesh):
        exported = jax.export.export(step.jitted, platforms=['cuda', 'tpu'])(state, batch)
    text = exported.mlir_module()
    out[name] = text
print(json.dumps(out))
'''


def _main_signature(text: str) -> list[tuple[str, str, str]]:
    """(element type, attributes, location) of each argument of the exported main."""
    header = text[text.index('func.func public @main('):]
    header = header[:header.index(') -> (')]
    args = []
    for chunk in re.split(r'%arg\d+: ', header)[1:]:
        shape = re.match(r'tensor<([^>]*)>', chunk).group(1)
        loc = re.search(r'loc\("([^"]*)"\)', chunk)
        args.append((shape.split('x')[-1], chunk, loc.group(1) if loc else ''))
    return args


def _elements(attrs: str) -> int:
    dims = re.match(r'tensor<([^>]*)>', attrs).group(1).split('x')[:-1]
    return int(np.prod([int(d) for d in dims])) if dims else 1


def _check_exported_step(name: str, text: str, batch_keys=('image',)) -> None:
    convs = _conv_ops(text)
    assert convs, name
    for op in convs:  # compute in bf16, whatever the layer (dense, depthwise or grouped)
        assert re.search(r'\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xbf16>', op), (name, op)
    assert 'custom_call' not in text and 'callback' not in text, name
    args = _main_signature(text)
    assert args
    for dtype, attrs, loc in args:
        if any(part in loc for part in ('params', 'opt_state', 'batch_stats', 'ema')) and dtype[0] in 'bf':
            assert dtype == 'f32', (name, loc, dtype)  # floats in f32 (the step counters are i32)
        if any(f"['{key}']" in loc for key in batch_keys):
            assert 'sdy.sharding<@mesh, [{"data"}' in attrs, (name, loc, attrs)
    big = [loc for _, attrs, loc in args if 'params' in loc and _elements(attrs) >= 2**18]
    sharded = [loc for _, attrs, loc in args if '{"data"}' in attrs and 'params' in loc]
    assert bool(sharded) == bool(big), f'{name}: shard_params=True split {sharded} of {big}'
    # Softmax cross-entropy on [batch, classes] f32 logits: its exp/log never in bf16.
    for op in re.findall(r'stablehlo\.(?:exponential|log) [^\n]*', text):
        m = re.search(r'tensor<16x10x(\w+)>', op)
        if m:
            assert m.group(1) == 'f32', (name, op)


def _one_model_per_family() -> list[str]:
    """The smallest registered model of each family (VGG's variants count as one family)."""
    smallest = {'efficientnet': 'efficientnet_b0', 'resnet': 'resnet_tiny', 'nfnet': 'dm_nfnet_f0',
                'mobilenet': 'mobilenetv3_small_100', 'densenet': 'densenet121',
                'resnetv2': 'resnetv2_50x1_bit', 'nasnet': 'nasnetamobile', 'vgg': 'vgg11',
                'mnasnet': 'mnasnet0_5', 'xception': 'legacy_xception', 'inception': 'googlenet',
                'shufflenet': 'shufflenet_v1_g3', 'alexnet': 'alexnet_original'}
    families = sorted({('vgg' if f.startswith('vgg') else f)
                       for f in map(models.get_model_family, models.list_models())})
    names = [smallest.get(f) or next(n for n in models.list_models() if models.get_model_family(n) == f)
             for f in families]
    assert all(n in models.list_models() for n in names), names
    return names


# Fewer of the same blocks where the full depth takes a minute to lower: what is checked
# (dtypes, shardings, no callbacks) is per layer kind, not per layer.
_EXPORT_SHRINK = {
    'efficientnet_b0': {'depth_mult': 0.3}, 'densenet121': {'block_config': (2, 2, 2, 2)},
    'nasnetamobile': {'cells_per_stage': 1}, 'dm_nfnet_f0': {'depths': (1, 1, 1, 1)},
    'resnetv2_50x1_bit': {'stage_sizes': (1, 1, 1, 1)}, 'legacy_senet154': {'stage_sizes': (1, 1, 1, 1)},
    'wrn28_10': {'depth': 10},
}


@pytest.mark.parametrize('chunk', [0, 1, 2])
def test_supervised_step_of_every_family_exports_for_gpu_and_tpu_in_bf16(chunk):
    from tools import scale_check

    names = _one_model_per_family()[chunk::3]
    # Inception-ResNet-v2's last max-pool has no output below 75 px once differentiated.
    out = run_python(EXPORT_CODE % repr([(n, max(scale_check.smallest_resolution(n), 75 if 'inception' in n else 0),
                                          _EXPORT_SHRINK.get(n, {})) for n in names]))
    assert sorted(out) == sorted(names)
    for name, text in out.items():
        _check_exported_step(name, text)



TEACHER_STUDENT_EXPORT_CODE = '''
import json
import jax, jax.numpy as jnp
import models
from configs.mpl import mnist5k
from tools import scale_check
from trainers import core, optim
from trainers import meta_pseudo_labels as mpl

mesh = core.create_mesh()
data = core.batch_sharding(mesh)
out = {}

# Noisy Student's student step: the supervised step on labeled + pseudo-labeled images,
# soft targets and per-example weights in the batch.
step, state, batch = scale_check.abstract_step('efficientnet_b0', devices=8, batch=16, resolution=32,
                                               shard_params=True, dtype='bfloat16')
batch = dict(batch, targets=jax.ShapeDtypeStruct((16, 10), jnp.float32, sharding=data),
             weight=jax.ShapeDtypeStruct((16,), jnp.float32, sharding=data))
with jax.set_mesh(step.mesh):
    out['noisy_student'] = jax.export.export(step.jitted, platforms=['cuda', 'tpu'])(state, batch).mlir_module()

# The MPL joint teacher-student step.
config = mnist5k.get_config()
config.batch_size, config.unlabeled_ratio, config.compute_dtype = 16, 1.0, 'bfloat16'
model = models.create_model('mobilenetv3_small_100', num_classes=10, dtype=jnp.bfloat16)
s_sched = mpl.student_schedule(config)
s_tx = optim.create_optimizer(config, s_sched)
t_conf = mpl.teacher_config(config)
t_sched = optim.create_schedule(t_conf)
t_tx = optim.create_optimizer(t_conf, t_sched)

def init(tx, use_ema):
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    p = v['params']
    return core.TrainState(step=jnp.zeros((), jnp.int32), params=p, batch_stats=v.get('batch_stats', {}),
                           opt_state=tx.init(p), ema_params=p if use_ema else {},
                           ema_batch_stats=v.get('batch_stats', {}) if use_ema else {})

with jax.set_mesh(mesh):
    abstract = jax.eval_shape(lambda: mpl.MPLState(teacher=init(t_tx, False), student=init(s_tx, True),
                                                   reward_baseline=jnp.zeros((), jnp.float32)))
shardings = core.state_shardings(mesh, abstract, True)
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=data)
batch = {'image': images, 'label': jax.ShapeDtypeStruct((16,), jnp.int32, sharding=data),
         'image_uw': images, 'image_us': images}
step = core.mesh_jit(mpl.make_mpl_step(model, model, t_tx, s_tx, t_sched, s_sched, config), mesh,
                     in_shardings=(shardings, data), out_shardings=(shardings, core.replicated(mesh)))
with jax.set_mesh(mesh):
    out['mpl'] = jax.export.export(step.jitted, platforms=['cuda', 'tpu'])(state, batch).mlir_module()
print(json.dumps(out))
'''


def test_noisy_student_and_mpl_steps_export_for_gpu_and_tpu_in_bf16():
    out = run_python(TEACHER_STUDENT_EXPORT_CODE)
    _check_exported_step('noisy_student', out['noisy_student'], batch_keys=('image', 'targets', 'weight'))
    _check_exported_step('mpl', out['mpl'], batch_keys=('image', 'image_uw', 'image_us'))
