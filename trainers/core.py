"""The training core every trainer stands on: mesh, sharded state, jitted steps.

One code path for 1 CPU, 8 accelerators or many hosts. The batch is sharded over the
mesh axis 'data'; the state is replicated, or, with `config.shard_params`, its large
arrays are split over the same axis (FSDP-style: XLA gathers them where the forward needs
them). Because the step runs under `jax.jit` on global arrays, BatchNorm statistics are
computed over the global batch (synchronised BN) with no `axis_name` bookkeeping.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxnets_errors import ConfigError
from trainers.progress import LogCompilation, Progress

DATA_AXIS = 'data'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(config: ml_collections.ConfigDict):
    name = config.get('compute_dtype', 'float32')
    if name not in DTYPES:
        raise ConfigError(
            f'config.compute_dtype={name!r} is not supported; use one of {sorted(DTYPES)}.'
        )
    return DTYPES[name]


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue exactly: arrays only, no functions.

    `ema_params`/`ema_batch_stats` are empty dicts when EMA is off; `batch_stats` is an
    empty dict for models without BatchNorm. The data position is `step` itself, since
    the pipeline's batches are a function of (seed, step).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any


# ----------------------------------------------------------------------------- mesh


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over every device of every process, in process order.

    `jax.devices()` lists process 0's devices first, so each process's contiguous slice
    of the global batch lands on its own devices.
    """
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices, (DATA_AXIS,))


DEFAULT_COMPILATION_CACHE = os.path.join('~', '.cache', 'flaxnets', 'jax')


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None: the per-user
    default, `$FLAXNETS_COMPILATION_CACHE` or ~/.cache/flaxnets/jax; '': off).

    A program compiled once on a machine (same JAX, XLA flags and shapes) is read back on
    the next run instead of recompiled: the init and train-step compilations that dominate
    a CPU run's start-up. Programs that compile in under a second are not stored; the
    least recently used entries are dropped past 4 GiB. Returns
    the directory in use, or None when off.
    """
    if directory is None:
        directory = os.environ.get('FLAXNETS_COMPILATION_CACHE', DEFAULT_COMPILATION_CACHE)
    if not directory:
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        logging.warning('Compilation cache off: cannot create %s (%s).', directory, e)
        return None
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    # Least recently used entries go beyond 4 GiB, so the cache cannot fill a disk.
    jax.config.update('jax_compilation_cache_max_size', 4 * 2**30)
    return directory


def _split_unit(n_dev: int | None, n_proc: int | None) -> tuple[int, int, int]:
    """(devices, processes, the smallest batch both split evenly); None: this run's."""
    n_dev = jax.device_count() if n_dev is None else n_dev
    n_proc = jax.process_count() if n_proc is None else n_proc
    return n_dev, n_proc, int(np.lcm(n_dev, n_proc))


def check_batch_size(name: str, batch: int, n_dev: int | None = None, n_proc: int | None = None) -> None:
    """Refuses a global train batch the devices and processes cannot split evenly, naming
    the nearest sizes that they can (every device gets an equal slice)."""
    n_dev, n_proc, m = _split_unit(n_dev, n_proc)
    if batch <= 0:
        raise ConfigError(f'{name}={batch} must be a positive multiple of {m}.')
    if batch % m:
        lower, upper = (batch // m) * m, (batch // m + 1) * m
        nearby = ' or '.join(str(b) for b in (lower, upper) if b > 0)
        raise ConfigError(
            f'{name}={batch} must be divisible by the number of devices ({n_dev}) and processes '
            f'({n_proc}): use {nearby} (a multiple of {m}).'
        )


def eval_batch_size(batch: int, n_dev: int | None = None, n_proc: int | None = None) -> int:
    """The evaluation batch actually used: `batch` rounded up to a multiple of the device
    (and process) count. The padded rows are masked out of every metric, so any
    configured size evaluates on any number of devices."""
    if batch <= 0:
        raise ConfigError(f'eval_batch_size={batch} must be positive.')
    m = _split_unit(n_dev, n_proc)[2]
    return -(-batch // m) * m


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state: Any, shard_params: bool, min_size: int = 2**18):
    """Sharding for every leaf of the state.

    Replicated by default. With `shard_params`, each array of at least `min_size`
    elements is split over 'data' along its largest dimension divisible by the mesh
    size; parameters, optimizer moments and EMA have equal shapes, so they get equal
    shardings and the update needs no resharding.
    """
    n = mesh.shape[DATA_AXIS]

    def spec(x):
        shape = getattr(x, 'shape', ())
        if not shard_params or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return replicated(mesh)
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % n == 0:
                parts = [None] * len(shape)
                parts[d] = DATA_AXIS
                return NamedSharding(mesh, P(*parts))
        return replicated(mesh)

    return jax.tree.map(spec, abstract_state)


class MeshJit:
    """`jax.jit(fun, **kwargs)` whose every trace (call, `lower`, `trace`) happens under
    `jax.set_mesh(mesh)`.

    Model code sees the mesh while it is traced: `models.layers.conv_general_dilated`
    keeps grouped convolutions local to each device's slice of the batch that way (XLA's
    partitioner would gather the whole batch for them). Every other attribute is the
    jitted function's.
    """

    def __init__(self, fun: Callable, mesh: Mesh, **jit_kwargs):
        self._jitted = jax.jit(fun, **jit_kwargs)
        self.mesh = mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jitted.trace(*args, **kwargs)

    @property
    def jitted(self):
        """The plain `jax.jit` function (for `jax.export`; trace it under `self.mesh`)."""
        return self._jitted

    def __getattr__(self, name: str):
        return getattr(self._jitted, name)


def mesh_jit(fun: Callable, mesh: Mesh, **jit_kwargs) -> MeshJit:
    """`jax.jit` traced under the run's mesh (see :class:`MeshJit`); use it for every
    function that applies a model."""
    return MeshJit(fun, mesh, **jit_kwargs)


# ----------------------------------------------------------------------------- state


def gathered(tree: Any) -> Any:
    """`tree` replicated on every device of the mesh being traced under (as `mesh_jit`
    traces); unchanged without one.

    With `shard_params` the state lives split over 'data' (FSDP). Left to itself, XLA's
    partitioner may then keep a layer's kernel split and all-gather the *activations*
    instead (seen: AlexNet's conv3, fc6 and fc7 gathered the whole batch), which costs
    batch-sized traffic and memory on every device. Gathering the parameters where the
    step starts is FSDP's own pattern: parameters move, activations stay local; the
    gradient of this constraint is the reduce-scatter back to the sharded state.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, P())


def model_variables(params, batch_stats) -> dict:
    variables = {'params': params}
    if batch_stats:
        variables['batch_stats'] = batch_stats
    return variables


# The init program runs once: XLA:CPU's backend optimisations cost more than they save.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What a run knows about its train state before any value exists.

    `abstract` holds `jax.ShapeDtypeStruct`s carrying the final shardings: enough to restore
    a checkpoint into, fingerprint, count parameters or build freeze masks, and it costs one
    trace, no compilation. `init()` compiles and runs the init program; a resumed run never
    calls it (trainers/loop.py).
    """

    abstract: Any
    shardings: Any
    init: Callable[[], Any]


def train_state_spec(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    use_ema: bool,
    mesh: Mesh,
    shard_params: bool = False,
) -> StateSpec:
    """The state's abstract shapes and shardings, and the program that initializes it.

    The init program holds only the variables' initializers: flax's `lazy_init` traces the
    model on an abstract input and drops the forward pass. Those initializers (a counter-
    based RNG and an inverse error function per variable) are what XLA spends the init's
    compilation on, and the program runs once, so on CPU it is compiled without XLA's
    backend optimisations (`INIT_COMPILER_OPTIONS`): resnet50's init compiles in 2.9 s
    instead of 6.5 s, efficientnet_b0's in 10 s instead of 18 s (224 px, idle 2-core CPU).
    Values are `model.init`'s to float32 rounding (the last bit of a few per cent of them
    differs, as between `model.init` eagerly and under `jax.jit`).
    """

    def init() -> TrainState:
        variables = model.lazy_init(
            {'params': rng, 'dropout': rng}, jax.ShapeDtypeStruct(input_shape, jnp.float32),
            train=False,
        )
        params = variables['params']
        batch_stats = variables.get('batch_stats', {})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if use_ema else {},
            ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if use_ema else {},
        )

    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(init)
    shardings = state_shardings(mesh, shapes, shard_params)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
    return StateSpec(abstract=abstract, shardings=shardings, init=lambda: mesh_jit(
        init, mesh, out_shardings=shardings, compiler_options=options)())


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation,
                       **spec_kwargs) -> tuple[TrainState, Any]:
    """The initialized state in its final sharding and the shardings (arguments as
    :func:`train_state_spec`'s), for callers that need the values at once."""
    spec = train_state_spec(model, tx, **spec_kwargs)
    return spec.init(), spec.shardings


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (smoothed) integer labels."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def example_losses(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against `batch['targets']` (soft, e.g. mixup or
    pseudo-labels) when present, else against the integer `batch['label']`.

    Label smoothing applies to either: targets become (1 - s) * targets + s / K.
    """
    if 'targets' not in batch:
        return cross_entropy(logits, batch['label'], label_smoothing)
    targets = batch['targets'].astype(jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (ties broken by index)."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


# ----------------------------------------------------------------------------- steps


def _frozen_norm_interceptor(frozen_stats: Any):
    """A flax method interceptor that runs the BatchNorm layers marked in `frozen_stats`
    as unbound eval-mode copies on their own variables (None when none is frozen)."""
    frozen_norms = frozenset(
        tuple(p.key for p in path[:-1])
        for path, frozen in jax.tree_util.tree_leaves_with_path(frozen_stats or {}) if frozen
    )
    if not frozen_norms:
        return None

    def eval_mode_frozen_norms(next_fun, args, kwargs, context):
        norm = context.module
        if (context.method_name == '__call__' and isinstance(norm, flax.linen.BatchNorm)
                and tuple(norm.path) in frozen_norms):
            variables = {k: norm.variables[k] for k in ('params', 'batch_stats') if k in norm.variables}
            return norm.clone(parent=None, use_running_average=True).apply(variables, *args, **kwargs)
        return next_fun(*args, **kwargs)

    return eval_mode_frozen_norms


def batch_loss(per_example: jax.Array, batch: dict) -> jax.Array:
    """The step's loss from per-example losses.

    With 'weight' (teacher-student batches: per-example weights that sum to the intended
    normalisation) the weighted sum; otherwise the mean. Examples whose 'valid' is 0 (an
    image that could not be decoded, replaced by a stand-in) count for nothing: the mean
    is over the valid ones, and weights are rescaled to keep their sum.
    """
    if 'valid' not in batch:
        return jnp.sum(per_example * batch['weight']) if 'weight' in batch else per_example.mean()
    valid = batch['valid'].astype(jnp.float32)
    if 'weight' in batch:
        w = batch['weight'] * valid
        return jnp.sum(per_example * w) * (jnp.sum(batch['weight']) / jnp.maximum(jnp.sum(w), 1e-12))
    return jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def ema_update(decay: float, state: TrainState, params: Any, batch_stats: Any) -> dict:
    """The EMA fields after a step (an exponential moving average of params and stats)."""
    ema = lambda e, x: decay * e + (1.0 - decay) * x  # noqa: E731
    return dict(ema_params=jax.tree.map(ema, state.ema_params, params),
                ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, batch_stats))


def make_train_step(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    *,
    frozen_params: Any = None,
    frozen_stats: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure supervised step: (state, batch) -> (state, metrics). Not yet jitted.

    The batch holds 'image' and 'label', optionally 'targets' (soft targets, used for the
    loss instead of 'label'), 'weight' (per-example loss weights) and 'valid' (0 for an
    undecodable example's stand-in); see `batch_loss`. Teacher-student trainers feed
    labeled and pseudo-labeled examples through this same step that way. With 'valid',
    the metrics count the skipped examples ('skipped').

    Dropout and stochastic-depth randomness comes from fold_in(seed, step), so a resumed
    run draws exactly what the uninterrupted run drew.

    Fine-tuning with frozen layers: `frozen_params`, a tree of Python bools shaped like
    `params`, marks parameters behind `jax.lax.stop_gradient`. Their gradients are zero,
    so XLA drops the weight-gradient computations, and `grad_norm` counts only trainable
    parameters; the optimizer must also leave them alone (see
    `finetune.freeze_optimizer`), or weight decay would still move them. `frozen_stats`,
    shaped like `batch_stats`, marks frozen BatchNorm layers (a marked statistic freezes
    its layer): they run in eval mode in the train step too, normalising with their
    running statistics and leaving them as they are (timm's `FrozenBatchNorm2d`), so a
    frozen block computes in training exactly what it computes at evaluation.
    """
    base_rng = jax.random.key(config.seed)
    label_smoothing = config.get('label_smoothing', 0.0)
    ema_decay = config.get('ema_decay', 0.0)
    interceptor = _frozen_norm_interceptor(frozen_stats)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(base_rng, state.step)
        has_bn = bool(state.batch_stats)

        def loss_fn(params):
            params = gathered(params)
            if frozen_params is not None:
                params = jax.tree.map(
                    lambda frozen, p: jax.lax.stop_gradient(p) if frozen else p, frozen_params, params
                )
            with (flax.linen.intercept_methods(interceptor) if interceptor
                  else contextlib.nullcontext()):
                out, mutated = model.apply(
                    model_variables(params, state.batch_stats), batch['image'], train=True,
                    mutable=['batch_stats'] if has_bn else [], rngs={'dropout': rng},
                )
            return batch_loss(example_losses(out, batch, label_smoothing), batch), (out, mutated)

        (loss, (logits, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = mutated['batch_stats'] if has_bn else state.batch_stats
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        if ema_decay:
            new = new.replace(**ema_update(ema_decay, state, params, batch_stats))
        correct = topk_correct(logits, batch['label'], 1)
        metrics = {
            'loss': loss,
            'top1': correct.mean(),
            'grad_norm': optax.global_norm(grads),
            'param_norm': optax.global_norm(params),
            'lr': schedule(state.step),
        }
        if 'valid' in batch:
            valid = batch['valid'].astype(jnp.float32)
            metrics['top1'] = jnp.sum(correct * valid) / jnp.maximum(jnp.sum(valid), 1.0)
            metrics['skipped'] = jnp.sum(1.0 - valid)
        return new, metrics

    return step_fn


def jit_train_step(step_fn, state_sharding, mesh: Mesh):
    """jit with explicit shardings and the state donated (updated in place); the first
    call logs its compilation time."""
    return LogCompilation(mesh_jit(
        step_fn,
        mesh,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    ), 'train step')


def make_eval_step(model: flax.linen.Module, mesh: Mesh):
    """Jitted eval step returning masked *sums* (loss, top-1, top-5, count).

    Sums, not means, so the padded last batch is weighted correctly and the host adds
    them up only once, at the end of the pass.
    """

    def eval_fn(params, batch_stats, batch):
        logits = model.apply(model_variables(gathered(params), gathered(batch_stats)), batch['image'],
                             train=False)
        mask = batch['mask'].astype(jnp.float32)
        loss = cross_entropy(logits, batch['label'])
        return {
            'loss': jnp.sum(loss * mask),
            'top1': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
            'top5': jnp.sum(topk_correct(logits, batch['label'], 5) * mask),
            'count': jnp.sum(mask),
        }

    return mesh_jit(eval_fn, mesh, in_shardings=(None, None, batch_sharding(mesh)),
                    out_shardings=replicated(mesh))


def evaluate(eval_step, params, batch_stats, batches: Iterator[dict], *,
             num_batches: int | None = None, desc: str = 'Evaluation') -> dict[str, float]:
    """One pass: sums stay on device until the pass ends (one host transfer). A pass
    longer than a few seconds logs its progress (ETA from `num_batches`, when given)."""
    totals = None
    progress = Progress(desc, num_batches, 'batches')
    for batch in batches:
        sums = eval_step(params, batch_stats, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        progress.update(1, wait=totals)
    progress.close()
    if totals is None:
        raise ValueError('The evaluation split yielded no batches.')
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {
        'loss': float(totals['loss']) / count,
        'top1': float(totals['top1']) / count,
        'top5': float(totals['top5']) / count,
        'num_examples': int(round(count)),
    }


# ----------------------------------------------------------------------------- input


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's slice of the batch into global arrays on the mesh."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def prefetch_to_device(
    batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Keeps `size` batches transferred to the devices ahead of the consumer.

    Transfers are asynchronous, so the copy of the next batches overlaps the running step
    without a helper thread. Creating global arrays on a second thread while multi-device
    programs with collectives were in flight deadlocked XLA:CPU with gloo collectives
    (2 processes on one machine, `tests/test_trainer.py`), so everything stays on the
    thread that dispatches the steps. An error from the source is raised when the consumer
    reaches its position, after the batches read before it. Closing the generator stops
    reading the source.
    """
    source = iter(batches)
    ahead: collections.deque = collections.deque()
    error = None
    while True:
        while error is None and len(ahead) <= max(size, 0):
            try:
                batch = next(source)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - re-raised in order, below
                error = e
                break
            ahead.append(to_global(batch, sharding))
        if not ahead:
            if error is not None:
                raise error
            return
        yield ahead.popleft()
