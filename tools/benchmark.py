"""Train-step and inference throughput, compile time and memory of any registered model.

    python tools/benchmark.py --model resnet50 --batch-size 32 --resolution 64
    python tools/benchmark.py --model resnet50 --resolution 64 --dtype bfloat16
    python tools/benchmark.py --model densenet121 --resolution 64 --compare-timm
    python tools/benchmark.py --model resnet50 --resolution 64 --freeze '^params/(?!fc/)'
    python tools/benchmark.py --model efficientnet_b0 --batch-size 8 --profile 3
    python tools/benchmark.py --model resnet50 --resolution 64 --dense-conv native

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

`--profile N` runs N train steps and N inference calls under the JAX profiler and says where
the time goes: each executed HLO instruction's time (XLA:CPU reports them one by one),
grouped by what it does (convolutions or matrix products, forward or backward,
normalisation, depthwise taps, layout copies, the optimizer and loss), with the top
instructions. `--dense-conv` / `--depthwise-conv` force a convolution formulation
(models/dense_conv.py, models/depthwise.py) to compare them.

With `--compare-timm` the two frameworks are timed interleaved (A, B, A, B, ...:
`--repeats` rounds of `--steps` calls each, medians over the rounds) so a change in the
machine's load hits both alike; run it on an otherwise idle machine all the same (torch's
OpenMP threads suffer far more from a busy core than XLA's). `time_to_first_step_s` is the
wall time from building the state to the first finished train step (init and step
compilation included); run the command twice to see it with JAX's persistent compilation
cache warm (`--compilation-cache-dir`, '' to turn it off).

    python tools/benchmark.py --model tf_efficientnet_l2 --resolution 800 --batch-size 64 \
        --devices 64 --shard-params --remat block

`--devices N` only compiles: the train step for N devices (N fake CPU devices where
there is no such accelerator) from abstract shapes, and reports XLA's per-device memory
(arguments, outputs, temporaries) without running or allocating anything. `--remat block`
rematerialises every block (`config.remat`): the same numbers, less activation memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _requested_devices(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a.startswith('--devices='):
            return int(a.split('=', 1)[1])
        if a == '--devices' and i + 1 < len(argv):
            return int(argv[i + 1])
    return 0


if __name__ == '__main__' and _requested_devices(sys.argv[1:]) > 1:
    # Fake host devices for a memory report on a machine without N accelerators; the flag
    # only concerns the CPU platform, so it is harmless where the accelerators exist.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count='
                               + str(_requested_devices(sys.argv[1:]))).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import models  # noqa: E402
from tools import scale_check  # noqa: E402
from trainers import core, finetune, optim  # noqa: E402


def _bench_config(args) -> ml_collections.ConfigDict:
    return scale_check.step_config(args.batch_size, args.dtype, num_train_steps=1000,
                                   label_smoothing=0.0)


def _timed(fn, n: int) -> float:
    """Median seconds per call of `n` calls of `fn` (which waits for its own result)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(runners: dict[str, callable], *, steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each runner, timed in alternation: `repeats` rounds in
    which every runner makes `steps` calls, after `warmup` untimed calls each. Returns
    the median over rounds of each round's median."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    rounds: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            rounds[k].append(_timed(fn, steps))
    return {k: statistics.median(v) for k, v in rounds.items()}


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


def setup_jax(args) -> tuple[dict, dict, dict]:
    """Builds and compiles our train step and inference; returns (facts, runners, the
    compiled executables), each keyed 'train' / 'infer'."""
    cfg = models.get_model_cfg(args.model)
    channels = cfg.input_size[2]
    config = _bench_config(args)
    model = models.create_model(args.model, dtype=core.compute_dtype(config), remat=args.remat)
    mesh = core.create_mesh()
    schedule = optim.create_schedule(config)
    freeze = finetune.compile_patterns(args.freeze, 'freeze')
    tx = finetune.freeze_optimizer(optim.create_optimizer(config, schedule), freeze)
    shape = (args.batch_size, args.resolution, args.resolution, channels)
    start = time.perf_counter()
    state, shardings = core.create_train_state(
        model, tx, rng=jax.random.key(0), input_shape=(1, *shape[1:]), use_ema=False, mesh=mesh
    )
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
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
        jax.block_until_ready(metrics['loss'])

    train_once()
    first_step = time.perf_counter() - start

    st = holder['state']
    infer = core.mesh_jit(lambda p, s, x: model.apply(core.model_variables(p, s), x, train=False), mesh)
    t = time.perf_counter()
    compiled_infer = infer.lower(st.params, st.batch_stats, batch['image']).compile()
    infer_compile = time.perf_counter() - t

    def infer_once():
        jax.block_until_ready(compiled_infer(holder['state'].params, holder['state'].batch_stats,
                                             batch['image']))

    facts = {
        'backend': jax.default_backend(),
        'devices': jax.device_count(),
        'init_s': init_s,
        'train_compile_s': train_compile,
        'infer_compile_s': infer_compile,
        'time_to_first_step_s': first_step,
        **_peak_memory(compiled_step),
    }
    return facts, {'train': train_once, 'infer': infer_once}, {'train': compiled_step, 'infer': compiled_infer}


def bench_jax(args) -> dict:
    facts, runners, compiled = setup_jax(args)
    times = interleaved(runners, steps=args.steps, warmup=args.warmup, repeats=1)
    out = {**facts, 'train_images_per_sec': args.batch_size / times['train'],
           'infer_images_per_sec': args.batch_size / times['infer']}
    if args.profile:
        cls = type(models.create_model(args.model)).__name__
        out['profile'] = {k: profile(runners[k], compiled[k], args.profile, cls) for k in ('train', 'infer')}
    return out


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


def setup_torch(args) -> tuple[dict, dict]:
    """The timm (else torchvision) reference's train step and inference; (facts, runners)."""
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

    train_once()  # first calls allocate; not timed
    infer_once()
    return ({'reference': source, 'torch_threads': torch.get_num_threads()},
            {'train': train_once, 'infer': infer_once})


# ----------------------------------------------------------------------------- profile

_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<rest>.*)$')
_OPCODE = re.compile(r'(?:^|[\]}\)] )(?P<op>[a-z][a-z\-]*)\(')


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """Per instruction of an optimised HLO module: opcode, fusion kind and the op_name of
    its metadata (what a profile's event names refer to)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if not m:
            continue
        rest = m['rest']
        op = _OPCODE.search(rest.split(' metadata=')[0])
        op_name = re.search(r'op_name="([^"]*)"', rest)
        kind = re.search(r'kind=(k\w+)', rest)
        out[m['name']] = {'opcode': op['op'] if op else '?', 'kind': kind[1] if kind else '',
                          'op_name': op_name[1] if op_name else ''}
    return out


_NORM_SCOPE = re.compile(r'/(?:[\w.]*[._])?(?:bn|norm|gn|batchnorm|groupnorm)\d*/', re.IGNORECASE)


def categorize(name: str, info: dict | None, model_class: str = '') -> str:
    """A profile category for an executed HLO instruction: what the time is spent on.

    XLA keeps each instruction's JAX op_name (the Flax module path and the transforms
    around it): 'transpose(' marks the backward pass, a norm module's name (bn1, norm, ...)
    a normalisation, and ops outside the model's own scope are the loss, metrics and the
    optimizer update. With im2col (models/dense_conv.py) convolutions show as matmuls.
    """
    if info is None:
        return 'runtime'
    op, op_name = info['opcode'], info['op_name']
    backward = 'transpose(' in op_name
    in_model = bool(model_class) and f'{model_class}' in op_name
    primitive = op_name.rsplit('/', 1)[-1]  # a fusion carries its root's op_name
    if op == 'convolution' or primitive == 'conv_general_dilated':
        return 'conv backward' if backward else 'conv forward'
    if op == 'dot' or primitive == 'dot_general':
        return 'matmul backward' if backward else 'matmul forward'
    if op in ('transpose', 'copy') or 'transpose' in name or name.startswith('copy'):
        return 'layout (transpose/copy)'
    if op in ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all'):
        return 'collectives'
    if model_class and not in_model:
        return 'optimizer, loss, metrics'
    if '/conv_dw/' in op_name or 'depthwise' in op_name.lower():
        return 'depthwise (shifted taps)'
    if _NORM_SCOPE.search(op_name):
        return 'normalisation backward' if backward else 'normalisation forward'
    if op in ('reduce-window', 'select-and-scatter') or 'pool' in op_name:
        return 'pooling'
    return 'other elementwise (backward)' if backward else 'other elementwise (forward)'


def profile(run_once, compiled, steps: int, model_class: str = '') -> dict:
    """Runs `run_once` `steps` times under the JAX profiler and attributes the executed
    HLO instructions' time (XLA:CPU reports one event per instruction) to categories.

    Returns {'per_step_ms', 'categories': [(category, ms per step, share)],
    'top': [(instruction, category, ms per step, share)]}.
    """
    import glob
    import gzip
    import tempfile

    instructions = hlo_instructions(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run_once()
        wall = (time.perf_counter() - start) / steps
        files = glob.glob(os.path.join(d, '**', 'perfetto_trace.json.gz'), recursive=True)
        with gzip.open(files[0], 'rt') as f:
            trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    by_name: dict[str, float] = {}
    for e in events:
        if e.get('ph') == 'X' and e.get('name') in instructions:
            by_name[e['name']] = by_name.get(e['name'], 0.0) + e.get('dur', 0.0) / 1e3 / steps
    total = sum(by_name.values()) or 1.0
    cats: dict[str, float] = {}
    for name, ms in by_name.items():
        c = categorize(name, instructions[name], model_class)
        cats[c] = cats.get(c, 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        'per_step_ms': wall * 1e3,
        'instruction_ms': total,
        'categories': sorted(((c, ms, ms / total) for c, ms in cats.items()), key=lambda t: -t[1]),
        'top': [(n, categorize(n, instructions[n], model_class), ms, ms / total) for n, ms in top],
    }


def _print_profile(label: str, prof: dict) -> None:
    print(f"  profile of {label}: {prof['per_step_ms']:.0f} ms/step wall (profiled), "
          f"{prof['instruction_ms']:.0f} ms in HLO instructions (summed over threads)")
    for c, ms, share in prof['categories']:
        print(f'    {c:<28} {ms:8.1f} ms {100 * share:5.1f}%')
    print('    top instructions:')
    for n, c, ms, share in prof['top'][:10]:
        print(f'      {n:<40} {c:<26} {ms:7.1f} ms {100 * share:5.1f}%')


def _shard_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays that carry their shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def saved_activation_bytes(model, variables, images, labels) -> int:
    """Bytes that reverse-mode autodiff keeps from the forward pass for the backward pass
    of one train-mode loss (the residuals of ``jax.vjp``, read from its jaxpr: traced, not
    compiled), leaving out the inputs (parameters, images) themselves. Under
    ``remat='block'`` these are each block's inputs instead of its insides.

    This is what remat changes on any backend. XLA:CPU's compiled temporaries are no
    witness for it: measured for resnet50 at 128 px, batch 16, they are 0.76 GiB without
    remat and 0.84 GiB with it, against 0.86 and 0.18 GiB kept here; it drops the
    optimisation barriers that keep a recomputation late (the GPU/TPU compilers keep them).
    """

    def vjp(variables, images, labels):
        def loss(params, images):
            logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                                    mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.vjp(loss, variables['params'], images)

    closed, shapes = jax.make_jaxpr(vjp, return_shape=True)(variables, images, labels)
    n = len(jax.tree.leaves(shapes[1]))
    inputs = set(closed.jaxpr.invars)
    residuals = {v for v in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - n:]
                 if not hasattr(v, 'val') and v not in inputs}  # not literals, not inputs
    return sum(int(np.prod(v.aval.shape, dtype=np.int64)) * v.aval.dtype.itemsize for v in residuals)


def memory_report(args) -> dict:
    """Per-device memory of the train step on `args.devices` devices, from abstract shapes
    (nothing is allocated or run): the state each device holds under its shardings, the
    activations autodiff keeps for the backward pass at the per-device batch
    (:func:`saved_activation_bytes`, honouring `--remat`), and unless `--no-compile` XLA's
    compiled footprint on this backend."""
    if jax.device_count() < args.devices:
        raise SystemExit(f'error: --devices {args.devices}: only {jax.device_count()} devices here.')
    if args.batch_size % args.devices:
        raise SystemExit(f'error: --batch-size {args.batch_size} does not split over {args.devices} devices.')
    t = time.perf_counter()
    num_classes = models.get_model_cfg(args.model).num_classes
    step, state, batch = scale_check.abstract_step(
        args.model, devices=args.devices, batch=args.batch_size, resolution=args.resolution,
        shard_params=args.shard_params, dtype=args.dtype, num_classes=num_classes,
        model_kwargs={'remat': args.remat})
    per_device = args.batch_size // args.devices
    model = models.create_model(args.model, num_classes=num_classes, remat=args.remat,
                                dtype=core.compute_dtype(_bench_config(args)))
    variables = {'params': state.params, **({'batch_stats': state.batch_stats} if state.batch_stats else {})}
    images = jax.ShapeDtypeStruct((per_device, *batch['image'].shape[1:]), jnp.float32)
    labels = jax.ShapeDtypeStruct((per_device,), jnp.int32)
    gib = 2.0**30
    state_gib = _shard_bytes(state) / gib
    activations_gib = saved_activation_bytes(model, variables, images, labels) / gib
    result = {
        'model': args.model, 'resolution': args.resolution, 'global_batch': args.batch_size,
        'per_device_batch': per_device, 'devices': args.devices,
        'shard_params': args.shard_params, 'remat': args.remat, 'dtype': args.dtype,
        'backend': jax.default_backend(),
        'state_gib': state_gib, 'activations_gib': activations_gib,
        'estimate_gib': state_gib + activations_gib,
    }
    if args.compile:
        ma = step.lower(state, batch).compile().memory_analysis()
        result.update({
            'arguments_gib': ma.argument_size_in_bytes / gib,
            'temporaries_gib': ma.temp_size_in_bytes / gib,
            'outputs_gib': ma.output_size_in_bytes / gib,
            'per_device_gib': (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                               - ma.alias_size_in_bytes) / gib,
        })
    result['seconds'] = time.perf_counter() - t
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} @ {args.resolution}px, batch {args.batch_size} on {args.devices} devices "
              f"({per_device}/device), {args.dtype}, shard_params={args.shard_params}, remat={args.remat}: "
              f"per device {result['estimate_gib']:.2f} GiB = state {state_gib:.2f} + activations kept "
              f"for the backward pass {activations_gib:.2f}"
              + (f"; XLA:{result['backend']} compiled: {result['per_device_gib']:.2f} GiB (temporaries "
                 f"{result['temporaries_gib']:.2f})" if args.compile else '')
              + f" [{result['seconds']:.0f} s, nothing run]")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--resolution', type=int, default=0, help='0: the model default')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5,
                        help='with --compare-timm: interleaved rounds (median over them)')
    parser.add_argument('--compare-timm', action='store_true')
    parser.add_argument('--compilation-cache-dir', default=None,
                        help="JAX's persistent compilation cache ('' turns it off; default: "
                             "train.py's per-user cache)")
    parser.add_argument('--devices', type=int, default=0,
                        help='only compile for this many devices and report per-device memory')
    parser.add_argument('--shard-params', action='store_true', help='with --devices: FSDP state')
    parser.add_argument('--no-compile', dest='compile', action='store_false',
                        help='with --devices: only the traced estimate (state + saved activations)')
    parser.add_argument('--remat', default='none', choices=['none', 'block'],
                        help="'block': recompute each block's activations in the backward pass")

    parser.add_argument('--freeze', action='append', default=[], metavar='REGEX',
                        help='freeze matching variables (params/<path>, batch_stats/<path>)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='profile this many train steps and inference calls: where the '
                             'time goes, by kind of HLO instruction (not with --compare-timm)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')
    parser.add_argument('--dense-conv', choices=models.layers.DENSE_IMPLS, default=None,
                        help='formulation of dense convolutions (default: FLAXNETS_DENSE_CONV '
                             'or auto)')
    parser.add_argument('--depthwise-conv', choices=models.layers.DEPTHWISE_IMPLS, default=None,
                        help='formulation of depthwise convolutions (default: '
                             'FLAXNETS_DEPTHWISE_CONV or auto)')
    args = parser.parse_args(argv)
    if args.profile and args.compare_timm:
        parser.error('--profile times our step alone; run it without --compare-timm')
    with contextlib.ExitStack() as stack:
        if args.dense_conv:
            stack.enter_context(models.layers.dense_implementation(args.dense_conv))
        if args.depthwise_conv:
            stack.enter_context(models.layers.depthwise_implementation(args.depthwise_conv))
        return _run(args)


def _run(args) -> dict:
    if not args.resolution:
        args.resolution = models.get_model_cfg(args.model).input_size[0]
    cache = core.enable_compilation_cache(args.compilation_cache_dir)
    if args.devices:
        return memory_report(args)
    result = {'model': args.model, 'batch_size': args.batch_size, 'resolution': args.resolution,
              'dtype': args.dtype, 'freeze': args.freeze, 'compilation_cache': cache}
    if not args.compare_timm:
        result['flaxnets'] = bench_jax(args)
    else:
        ours, our_runners, _ = setup_jax(args)
        ref, ref_runners = setup_torch(args)
        runners = {'jax_train': our_runners['train'], 'torch_train': ref_runners['train'],
                   'jax_infer': our_runners['infer'], 'torch_infer': ref_runners['infer']}
        times = interleaved(runners, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        result['flaxnets'] = {**ours, 'train_images_per_sec': args.batch_size / times['jax_train'],
                              'infer_images_per_sec': args.batch_size / times['jax_infer']}
        result['reference'] = {**ref, 'train_images_per_sec': args.batch_size / times['torch_train'],
                               'infer_images_per_sec': args.batch_size / times['torch_infer']}
        result['repeats'] = args.repeats
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
              f"infer {f['infer_compile_s']:.1f}s | first step after {f['time_to_first_step_s']:.1f}s | "
              + ' '.join(
                  f'{k} {v:.0f}' for k, v in f.items() if k.endswith('_mb')))
        for k, prof in f.get('profile', {}).items():
            _print_profile(k, prof)
        if args.compare_timm:
            r = result['reference']
            print(f"  {r['reference']}  train {r['train_images_per_sec']:.1f} img/s | infer "
                  f"{r['infer_images_per_sec']:.1f} img/s ({r['torch_threads']} threads)")
            print(f"  ratio (flaxnets / reference, interleaved, median of {args.repeats}): train "
                  f"{result['ratio_train_images_per_sec']:.2f}x, infer "
                  f"{result['ratio_infer_images_per_sec']:.2f}x")
    return result


if __name__ == '__main__':
    main()
