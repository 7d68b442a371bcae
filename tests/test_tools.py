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


def test_benchmark_compares_with_the_reference_implementation():
    import pytest

    pytest.importorskip('torchvision')
    from tools import benchmark

    out = benchmark.main(['--model', 'resnet18', '--batch-size', '2', '--resolution', '32',
                          '--steps', '1', '--warmup', '0', '--compare-timm', '--json'])
    assert out['reference']['reference'].startswith(('timm', 'torchvision'))
    assert out['ratio_train_images_per_sec'] > 0 and out['ratio_infer_images_per_sec'] > 0
