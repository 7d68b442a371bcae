"""flaxnets entry point.

    python train.py --config configs/default.py --workdir /tmp/flaxnets/default \
        [--config.batch_size=256 ...]

The trainer is `config.trainer` ('supervised' | 'noisy_student' | 'mpl'). Starting again
with the same --workdir resumes from its newest checkpoint. Multi-host: pass
--coordinator_address/--num_processes/--process_id, or, on TPU pods, SLURM and Open MPI,
nothing: JAX detects the cluster itself.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (a get_config() module).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])



def _cluster_detected() -> bool:
    """True inside a multi-process SLURM / Open MPI job or a multi-host TPU slice, the
    cluster kinds `jax.distributed.initialize()` configures by itself."""
    for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
        value = os.environ.get(var, '')
        if value.isdigit() and int(value) > 1:
            return True
    return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def _initialize_distributed() -> None:
    import jax

    explicit = [f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)]
    if any(explicit) and not all(explicit):
        raise app.UsageError(
            '--coordinator_address, --num_processes and --process_id go together: give all three.'
        )
    detected = _cluster_detected()
    if not (all(explicit) or detected):
        return
    # CPU processes need a collectives backend; harmless on GPU/TPU.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if all(explicit):
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    else:
        jax.distributed.initialize()
    logging.info(
        'Process %d of %d; %d local / %d global devices.',
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def _config_keys(config, prefix='') -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, 'items'):
            keys.extend(_config_keys(v, prefix + k + '.'))
    return keys


def _explain_bad_override(argv: list[str]) -> str | None:
    """Names the --config.<key> overrides that the config file does not define."""
    import difflib
    import importlib.util

    path = None
    for i, a in enumerate(argv):
        if a.startswith('--config='):
            path = a.split('=', 1)[1]
        elif a == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
    if not path or not os.path.exists(path.split(':')[0]):
        return None
    spec = importlib.util.spec_from_file_location('_flaxnets_config', path.split(':')[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    known = _config_keys(module.get_config())
    bad = []
    for a in argv:
        if a.startswith('--config.'):
            key = a[len('--config.'):].split('=', 1)[0]
            if key not in known:
                close = difflib.get_close_matches(key, known, n=2)
                bad.append(f'--config.{key}' + (f" (did you mean {' or '.join(close)}?)" if close else ''))
    if not bad:
        return None
    return (
        f"Unknown config key(s) on the command line: {', '.join(bad)}. {path} defines no such "
        f'field; overrides can only change fields the config file sets.'
    )


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        message = _explain_bad_override(argv)
        if message is None:
            raise
        raise app.UsageError(message) from e


class _QuietLibraries(logging_std.Filter):
    """Keeps the console to our own lines: libraries' INFO chatter (orbax logs a dozen
    lines per checkpoint) is dropped; their warnings and errors still show."""

    NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/', '/absl/')

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or not any(
            part in record.pathname for part in self.NOISY
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # tf.data only: keep TensorFlow off the accelerators JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    _initialize_distributed()

    import trainers

    config = _CONFIG.value
    trainer = trainers.get_trainer(config.get('trainer', 'supervised'))
    trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=_parse_flags)
