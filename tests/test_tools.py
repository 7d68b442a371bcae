"""tools/model_table.py: exact MAC counting and the README block."""

from __future__ import annotations

from tools import model_table


def test_lenet5_macs_are_counted_exactly():
    stats = model_table.model_stats('lenet5')
    # C1 28*28*6*25, C3 as a dense 6->16 kernel 10*10*16*6*25, C5 120*400, F6 84*120, out 10*84.
    assert stats['macs'] == 117_600 + 240_000 + 48_000 + 10_080 + 840
    assert stats['params'] == 60_850


def test_resnet_macs_match_torchvision_figures():
    # torchvision's documented GFLOPS (multiply-adds) at 224 px: 1.81 and 4.09.
    assert abs(model_table.model_stats('resnet18')['macs'] / 1.81e9 - 1) < 0.005
    assert abs(model_table.model_stats('resnet50')['macs'] / 4.09e9 - 1) < 0.005


def test_readme_block_is_replaced(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{model_table.README_START}\nold\n{model_table.README_END}\nend\n')
    model_table.update_readme('| new |', str(readme))
    assert readme.read_text() == f'intro\n{model_table.README_START}\n| new |\n{model_table.README_END}\nend\n'


def test_benchmark_reports_throughput_compile_time_and_memory():
    from tools import benchmark

    out = benchmark.main(['--model', 'resnet_tiny', '--batch-size', '4', '--resolution', '16',
                          '--steps', '2', '--warmup', '0', '--json'])
    f = out['flaxnets']
    assert f['train_images_per_sec'] > 0 and f['infer_images_per_sec'] > 0
    assert f['train_compile_s'] > 0 and f['infer_compile_s'] > 0
    assert f['compiled_footprint_mb'] > 0


def test_benchmark_profile_attributes_the_step_to_what_it_does():
    """`--profile` reads XLA:CPU's per-instruction profiler events and the compiled HLO's
    op_names: a ResNet's train step spends its time in convolutions (native or as im2col
    matrix products), normalisation and elementwise work, forward and backward; the shares
    add up to the whole."""
    from tools import benchmark

    out = benchmark.main(['--model', 'resnet_tiny', '--batch-size', '4', '--resolution', '16',
                          '--steps', '1', '--warmup', '0', '--profile', '2', '--json'])
    train = out['flaxnets']['profile']['train']
    shares = {c: share for c, _, share in train['categories']}
    assert abs(sum(shares.values()) - 1) < 1e-6
    conv = sum(v for c, v in shares.items() if c.startswith(('conv', 'matmul')))
    assert conv > 0.1, shares
    assert any(c.startswith('normalisation') for c in shares), shares
    assert any('backward' in c for c in shares), shares
    assert train['top'] and train['instruction_ms'] > 0
    infer = {c for c, _, _ in out['flaxnets']['profile']['infer']['categories']}
    assert not any('backward' in c for c in infer) and 'optimizer, loss, metrics' not in infer


def test_profile_categories_follow_opcode_and_op_name():
    from tools import benchmark

    def info(op, op_name, kind=''):
        return {'opcode': op, 'kind': kind, 'op_name': op_name, 'source': ''}

    cat = lambda name, i: benchmark.categorize(name, i, 'ResNet')  # noqa: E731
    assert cat('convolution.3', info('convolution', 'jit(f)/transpose(jvp(ResNet))/conv1/'
                                     'conv_general_dilated')) == 'conv backward'
    assert cat('ynn_fusion.7', info('fusion', 'jit(f)/jvp(ResNet)/conv1/dot_general')) == 'matmul forward'
    assert cat('fusion.2', info('fusion', 'jit(f)/jvp(ResNet)/layer1_0/bn1/rsqrt')) == 'normalisation forward'
    assert cat('fusion.9', info('fusion', 'jit(f)/mul')) == 'optimizer, loss, metrics'
    assert cat('transpose_copy_fusion', info('fusion', 'jit(f)/jvp(ResNet)/x')) == 'layout (transpose/copy)'
    assert cat('add.1', None) == 'runtime'
    text = '  %conv.1 = f32[2,4,4,8]{3,2,1,0} convolution(%p0, %p1), metadata={op_name="a/b/conv_general_dilated"}'
    assert benchmark.hlo_instructions(text)['conv.1']['opcode'] == 'convolution'


def test_benchmark_frozen_backbone_step_is_smaller():
    """With everything but the classifier frozen, the step computes no weight gradients
    and keeps no optimizer state for the backbone: XLA's footprint of the compiled step
    (arguments, outputs, temporaries) must shrink."""
    from tools import benchmark

    common = ['--model', 'resnet_tiny', '--batch-size', '4', '--resolution', '16',
              '--steps', '1', '--warmup', '0', '--json']
    full = benchmark.main(common)['flaxnets']['compiled_footprint_mb']
    probe = benchmark.main([*common, '--freeze', '^(params|batch_stats)/(?!fc/)'])
    assert probe['freeze'] == ['^(params|batch_stats)/(?!fc/)']
    assert probe['flaxnets']['compiled_footprint_mb'] < 0.7 * full


def test_benchmark_compares_with_the_reference_implementation():
    import pytest

    pytest.importorskip('torchvision')
    from tools import benchmark

    out = benchmark.main(['--model', 'resnet18', '--batch-size', '2', '--resolution', '32',
                          '--steps', '1', '--warmup', '0', '--compare-timm', '--json'])
    assert out['reference']['reference'].startswith(('timm', 'torchvision'))
    assert out['ratio_train_images_per_sec'] > 0 and out['ratio_infer_images_per_sec'] > 0


def test_optimizer_with_adaptive_gradient_clipping_clips_units():
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from trainers import optim

    config = ml_collections.ConfigDict(dict(
        model='resnet18',  # its declared classifier is 'fc'
        batch_size=8, num_train_steps=10, learning_rate=1.0, lr_base_batch_size=0,
        schedule=dict(name='constant', warmup_steps=0), grad_clip_norm=0.0,
        optimizer=dict(name='sgd', momentum=0.0, weight_decay=0.0, agc_clipping=0.01),
    ))
    tx = optim.create_optimizer(config, optim.create_schedule(config))
    params = {'conv': {'kernel': jnp.ones((1, 1, 1, 2))}, 'fc': {'kernel': jnp.ones((2, 2))}}
    grads = {'conv': {'kernel': jnp.full((1, 1, 1, 2), 5.0)}, 'fc': {'kernel': jnp.full((2, 2), 5.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Each conv unit (|W| = 1) is clipped to |G| = 0.01; the classifier is left alone.
    np.testing.assert_allclose(np.asarray(updates['conv']['kernel']), -0.01, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates['fc']['kernel']), -5.0, rtol=1e-6)
