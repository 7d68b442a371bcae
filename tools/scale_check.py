"""What a sharded train step moves between devices, read from the compiled program.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tools/scale_check.py [--devices 8] [--shard-params] [--batch 16] [MODEL ...]

For each model (default: the whole registry) the trainer's own jitted train step is
compiled for `--devices` devices from abstract shapes (nothing is run, no weights are
made), with the batch sharded over 'data' and the state replicated (or FSDP-sharded with
`--shard-params`), and the compiled HLO is searched for collectives that move feature
maps of the global batch: an all-gather, all-to-all or collective-permute whose result has
rank >= 3 and the global batch as its leading dimension. A data-parallel step needs none:
parameters (FSDP) and the scalar and [batch, classes] metrics are the only things that
should move. Each model is compiled at the smallest of a few resolutions it accepts.

The same functions serve `tests/test_scale.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

import models  # noqa: E402
from trainers import core, optim  # noqa: E402

RESOLUTIONS = (32, 48, 64, 80, 96, 128, 160, 224, 299, 331)
_COLLECTIVE = re.compile(
    r'= (\w+)\[([\d,]*)\][^\n=]*? (all-gather|all-gather-start|all-to-all|collective-permute)\('
)


def step_config(batch: int, dtype: str = 'float32', **changes) -> ml_collections.ConfigDict:
    """SGD + momentum with weight decay (the optimizer of most shipped configs), constant
    learning rate; `changes` replace top-level fields. Also `tools/benchmark.py`'s step."""
    fields = dict(
        seed=0, batch_size=batch, num_train_steps=10, learning_rate=0.1, lr_base_batch_size=0,
        schedule=dict(name='constant', warmup_steps=0),
        optimizer=dict(name='sgd', momentum=0.9, nesterov=False, weight_decay=1e-4),
        label_smoothing=0.1, ema_decay=0.0, grad_clip_norm=0.0, compute_dtype=dtype,
    )
    return ml_collections.ConfigDict({**fields, **changes})


def smallest_resolution(name: str, candidates: Sequence[int] = RESOLUTIONS) -> int:
    """The smallest candidate square input the model trains on: its train-mode forward
    and backward pass have valid shapes (shape inference only, nothing is computed)."""
    cfg = models.get_model_cfg(name)
    model = models.create_model(name, num_classes=10)

    def loss(variables, x):
        out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                             rngs={'dropout': jax.random.key(0)})
        return out.sum()

    for r in candidates:
        x = jnp.zeros((2, r, r, cfg.input_size[2]))
        try:
            variables = jax.eval_shape(lambda x=x: model.init(jax.random.key(0), x, train=False))
            jax.eval_shape(jax.grad(loss), variables, x)
            return r
        except Exception:  # noqa: BLE001 - too small for this architecture: try the next
            continue
    return cfg.input_size[0]


def abstract_step(name: str, *, devices: int, batch: int, resolution: int,
                  shard_params: bool = False, dtype: str = 'float32', num_classes: int = 10,
                  model_kwargs: dict | None = None):
    """(jitted step, abstract state, abstract batch) of the supervised train step on the
    first `devices` devices; the arguments carry their shardings, so `.lower(...)` needs
    no arrays."""
    mesh = core.create_mesh(jax.devices()[:devices])
    config = step_config(batch, dtype)
    model = models.create_model(name, num_classes=num_classes, dtype=core.compute_dtype(config),
                                **(model_kwargs or {}))
    schedule = optim.create_schedule(config)
    tx = optim.create_optimizer(config, schedule)
    channels = models.get_model_cfg(name).input_size[2]
    shape = (batch, resolution, resolution, channels)

    def init():
        variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                               jnp.zeros((1, *shape[1:])), train=False)
        params = variables['params']
        return core.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables.get('batch_stats', {}),
                               opt_state=tx.init(params), ema_params={}, ema_batch_stats={})

    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(init)
    shardings = core.state_shardings(mesh, abstract, shard_params)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    data = core.batch_sharding(mesh)
    batch_spec = {'image': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=data),
                  'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)}
    step = core.jit_train_step(core.make_train_step(model, tx, schedule, config), shardings, mesh)
    return step, state, batch_spec


def batch_collectives(hlo_text: str, batch: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, shape) of every collective in compiled HLO text that moves a feature
    map of the global batch (rank >= 3, leading dimension `batch`)."""
    found = []
    for dtype, dims, op in _COLLECTIVE.findall(hlo_text):
        shape = tuple(int(d) for d in dims.split(',') if d)
        if len(shape) >= 3 and shape[0] == batch:
            found.append((op, dtype, shape))
    return found


def per_device_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device program
        analysis = analysis[0]
    return float(analysis.get('flops', 0.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='*', help='registered names (default: all)')
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--shard-params', action='store_true')
    args = parser.parse_args(argv)
    if jax.device_count() < args.devices:
        print(f'error: {args.devices} devices requested, {jax.device_count()} present; on a CPU '
              f'set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}.',
              file=sys.stderr)
        return 2
    names = args.models or models.list_models()
    bad_models = 0
    for name in names:
        t = time.perf_counter()
        res = smallest_resolution(name)
        step, state, batch = abstract_step(name, devices=args.devices, batch=args.batch,
                                           resolution=res, shard_params=args.shard_params)
        moves = batch_collectives(step.lower(state, batch).compile().as_text(), args.batch)
        bad_models += bool(moves)
        print(f'{name:28s} {res:4d} px  batch feature-map collectives: {len(moves):3d}'
              f'  ({time.perf_counter() - t:.0f} s)', flush=True)
    return 1 if bad_models else 0


if __name__ == '__main__':
    sys.exit(main())
