"""Train-step and inference throughput, compile time and memory of any registered model.

    python tools/benchmark.py --model resnet50 --batch-size 32 --resolution 64
    python tools/benchmark.py --model resnet50 --resolution 64 --dtype bfloat16
    python tools/benchmark.py --model densenet121 --resolution 64 --compare-timm
    python tools/benchmark.py --model resnet50 --resolution 64 --freeze '^params/(?!fc/)'

Runs on the current JAX backend (CPU, GPU or TPU) with the trainer's own jitted step
(SGD + momentum, weight decay, the model's BatchNorm updates, donated state), so the
images/s are what `train.py` gets minus the input pipeline. `--compare-timm` builds the
timm (else torchvision) model of the same name, random init, and times its train step
(SGD, same batch) and inference in the same process on the same inputs, printing our/their
ratio. Timings are medians over `--steps` runs after `--warmup` runs; compile time is the
ahead-of-time `lower().compile()` wall time. Memory: the device's peak where the backend
reports it (GPU/TPU), and XLA's compiled footprint of the train step (arguments, outputs
and temporaries) everywhere. `--freeze REGEX` (repeatable, `config.finetune.freeze`
syntax) times the step a fine-tune with those layers frozen runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from trainers import core, finetune, optim  # noqa: E402


def _bench_config(args) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        seed=0, batch_size=args.batch_size, num_train_steps=1000, learning_rate=0.1,
        lr_base_batch_size=0, schedule=dict(name='constant', warmup_steps=0),
        optimizer=dict(name='sgd', momentum=0.9, nesterov=False, weight_decay=1e-4),
        label_smoothing=0.0, ema_decay=0.0, grad_clip_norm=0.0, compute_dtype=args.dtype,
    ))


def _time_calls(fn, n: int, warmup: int) -> tuple[float, list[float]]:
    """Returns (first call seconds, steady-state per-call seconds) of a compiled call."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, times


def _peak_memory(compiled) -> dict:
    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        out['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
    try:
        ma = compiled.memory_analysis()
        total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                 - ma.alias_size_in_bytes)
        out['compiled_footprint_mb'] = total / 2**20
    except Exception:  # not every backend reports it
        pass
    return out


def bench_jax(args) -> dict:
    cfg = models.get_model_cfg(args.model)
    channels = cfg.input_size[2]
    config = _bench_config(args)
    model = models.create_model(args.model, dtype=core.compute_dtype(config))
    mesh = core.create_mesh()
    schedule = optim.create_schedule(config)
    freeze = finetune.compile_patterns(args.freeze, 'freeze')
    tx = finetune.freeze_optimizer(optim.create_optimizer(config, schedule), freeze)
    shape = (args.batch_size, args.resolution, args.resolution, channels)
    state, shardings = core.create_train_state(
        model, tx, rng=jax.random.key(0), input_shape=(1, *shape[1:]), use_ema=False, mesh=mesh
    )
    rng = np.random.default_rng(0)
    batch = core.to_global({
        'image': rng.standard_normal(shape).astype(np.float32),
        'label': rng.integers(0, cfg.num_classes, args.batch_size).astype(np.int32),
    }, core.batch_sharding(mesh))
    step = core.jit_train_step(core.make_train_step(
        model, tx, schedule, config, **finetune.frozen_step_kwargs(state, freeze)), shardings, mesh)
    t = time.perf_counter()
    compiled_step = step.lower(state, batch).compile()
    train_compile = time.perf_counter() - t
    holder = {'state': state}

    def train_once():
        holder['state'], metrics = compiled_step(holder['state'], batch)
        return metrics['loss']

    _, train_times = _time_calls(train_once, args.steps, args.warmup)

    st = holder['state']
    infer = jax.jit(lambda p, s, x: model.apply(core.model_variables(p, s), x, train=False))
    t = time.perf_counter()
    compiled_infer = infer.lower(st.params, st.batch_stats, batch['image']).compile()
    infer_compile = time.perf_counter() - t
    _, infer_times = _time_calls(
        lambda: compiled_infer(st.params, st.batch_stats, batch['image']), args.steps, args.warmup)
    train_s, infer_s = statistics.median(train_times), statistics.median(infer_times)
    return {
        'backend': jax.default_backend(),
        'devices': jax.device_count(),
        'train_images_per_sec': args.batch_size / train_s,
        'infer_images_per_sec': args.batch_size / infer_s,
        'train_compile_s': train_compile,
        'infer_compile_s': infer_compile,
        **_peak_memory(compiled_step),
    }


def _reference_model(name: str):
    """timm's model of that name if timm has it, else torchvision's; random init."""
    try:
        import timm

        if name in timm.list_models():
            return timm.create_model(name, pretrained=False), f'timm {timm.__version__}'
    except ImportError:
        pass
    import torchvision

    return torchvision.models.get_model(name, weights=None), f'torchvision {torchvision.__version__}'


def bench_torch(args) -> dict:
    import torch

    cfg = models.get_model_cfg(args.model)
    torch.manual_seed(0)
    ref, source = _reference_model(args.model)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    ref = ref.to(device)
    dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
    x = torch.randn(args.batch_size, cfg.input_size[2], args.resolution, args.resolution, device=device)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync():
        if device == 'cuda':
            torch.cuda.synchronize()

    def train_once():
        ref.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = ref(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        sync()

    @torch.no_grad()
    def infer_once():
        ref.eval()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            ref(x)
        sync()

    def timed(fn):
        for _ in range(args.warmup + 1):
            fn()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return {
        'reference': source,
        'torch_threads': torch.get_num_threads(),
        'train_images_per_sec': args.batch_size / timed(train_once),
        'infer_images_per_sec': args.batch_size / timed(infer_once),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--resolution', type=int, default=0, help='0: the model default')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--compare-timm', action='store_true')
    parser.add_argument('--freeze', action='append', default=[], metavar='REGEX',
                        help='freeze matching variables (params/<path>, batch_stats/<path>)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')
    args = parser.parse_args(argv)
    if not args.resolution:
        args.resolution = models.get_model_cfg(args.model).input_size[0]
    result = {'model': args.model, 'batch_size': args.batch_size, 'resolution': args.resolution,
              'dtype': args.dtype, 'freeze': args.freeze, 'flaxnets': bench_jax(args)}
    if args.compare_timm:
        result['reference'] = bench_torch(args)
        for k in ('train_images_per_sec', 'infer_images_per_sec'):
            result[f'ratio_{k}'] = result['flaxnets'][k] / result['reference'][k]
    if args.json:
        print(json.dumps(result))
    else:
        f = result['flaxnets']
        print(f"{args.model} @ {args.resolution}px, batch {args.batch_size}, {args.dtype}, "
              f"{f['backend']} x{f['devices']}" + (f", frozen {args.freeze}" if args.freeze else ''))
        print(f"  flaxnets  train {f['train_images_per_sec']:.1f} img/s | infer "
              f"{f['infer_images_per_sec']:.1f} img/s | compile train {f['train_compile_s']:.1f}s "
              f"infer {f['infer_compile_s']:.1f}s | " + ' '.join(
                  f'{k} {v:.0f}' for k, v in f.items() if k.endswith('_mb')))
        if args.compare_timm:
            r = result['reference']
            print(f"  {r['reference']}  train {r['train_images_per_sec']:.1f} img/s | infer "
                  f"{r['infer_images_per_sec']:.1f} img/s ({r['torch_threads']} threads)")
            print(f"  ratio (flaxnets / reference): train {result['ratio_train_images_per_sec']:.2f}x, "
                  f"infer {result['ratio_infer_images_per_sec']:.2f}x")
    return result


if __name__ == '__main__':
    main()
