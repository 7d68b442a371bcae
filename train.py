"""flaxnets entry point.

    python train.py --config configs/default.py --workdir /tmp/flaxnets/default \
        [--config.batch_size=256 ...]

The trainer is `config.trainer` ('supervised' | 'noisy_student' | 'mpl'). Starting again
with the same --workdir resumes from its newest checkpoint. --config is a path relative
to the working directory or to the repository root. A mistake in the command or config
(flaxnets_errors.UserError) prints one message and exits with status 2; --verbose or
FLAXNETS_VERBOSE=1 adds the traceback. Ctrl-C or SIGTERM (a preemption) finishes the
step, saves a checkpoint and exits with status 75 ("stopped cleanly, run the same command
to resume"); a second Ctrl-C aborts at once (status 130). A resume whose config changes
fields that break exact resumption is refused unless --allow_config_change. Multi-host: pass
--coordinator_address/--num_processes/--process_id, or, on TPU pods, SLURM and Open MPI,
nothing: JAX detects the cluster itself.
"""

from __future__ import annotations

import difflib
import glob
import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flaxnets_errors import ConfigError, InputNotFoundError, UserError

REPO = os.path.dirname(os.path.abspath(__file__))
USER_ERROR_EXIT_CODE = 2

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (a get_config() module).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index, 0..num_processes-1.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume even though the config changed fields that break exact resumption (model, data, '
    'batch size, seed, augmentation); the earlier configs stay in <workdir>/history/.'
)
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Show the traceback of user errors too (also: FLAXNETS_VERBOSE=1).'
)
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
        raise ConfigError(
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


def _config_arg_index(argv: list[str]) -> tuple[int, str] | None:
    """(index, value) of the --config argument: `--config=PATH` or `--config PATH`."""
    for i, a in enumerate(argv[1:], 1):
        if a.startswith('--config='):
            return i, a.split('=', 1)[1]
        if a == '--config' and i + 1 < len(argv):
            return i + 1, argv[i + 1]
    return None


def _resolve_config_path(argv: list[str]) -> list[str]:
    """Finds the --config file from any working directory.

    A path that does not exist as given is looked up relative to the repository root, so
    `python /path/to/flaxnets/train.py --config configs/default.py` works from anywhere.
    The optional `:argument` suffix of config_flags (`file.py:arg`) is kept.
    """
    found = _config_arg_index(argv)
    if found is None:
        return argv
    i, value = found
    path, sep, arg = value.partition(':')
    if os.path.isfile(path):
        return argv
    in_repo = os.path.join(REPO, path)
    if not os.path.isabs(path) and os.path.isfile(in_repo):
        argv = list(argv)
        argv[i] = argv[i][: len(argv[i]) - len(value)] + in_repo + sep + arg
        return argv
    pattern = os.path.join(REPO, 'configs', '**', '*.py')
    known = sorted(
        os.path.relpath(p, REPO) for p in glob.glob(pattern, recursive=True)
        if not p.endswith('__init__.py')
    )
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.8)
    hint = f' Did you mean {" or ".join(close)}?' if close else f' Configs: {", ".join(known)}.'
    where = os.getcwd() if os.path.isabs(path) else f'{os.getcwd()} and {REPO}'
    raise InputNotFoundError(f'Config file {path!r} not found (looked in {where}).{hint}')


def _parse_flags(argv: list[str]) -> list[str]:
    argv = _resolve_config_path(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad flag value, an unknown or missing flag
        raise ConfigError(str(e)) from e
    except (KeyError, AttributeError) as e:
        message = _explain_bad_override(argv)
        if message is None:
            raise
        raise ConfigError(message) from e


def _raised_in_orbax(record: logging_std.LogRecord) -> bool:
    """Whether the record carries an exception whose traceback runs through orbax."""
    if record.name != 'asyncio' or not record.exc_info or record.exc_info[2] is None:
        return False
    import traceback

    return any('/orbax/' in frame.filename for frame in traceback.extract_tb(record.exc_info[2]))


class _QuietLibraries(logging_std.Filter):
    """Keeps the console to our own lines: libraries' INFO chatter (orbax logs a dozen
    lines per checkpoint) is dropped; their warnings and errors still show."""

    NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/', '/absl/')

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.levelno >= logging_std.ERROR and (
            '/orbax/' in record.pathname or _raised_in_orbax(record)
        ):
            # A failed save or restore is raised to the loop (trainers/loop.py), which
            # reports it in one line; orbax's own report is a stack per thread, and
            # asyncio adds one per writer task ('Task exception was never retrieved').
            return False
        return record.levelno >= logging_std.WARNING or not any(
            part in record.pathname for part in self.NOISY
        )


def _quiet_closed_loop_errors() -> None:
    """After a failed asynchronous save, orbax's writer threads can finish after their
    asyncio loop closed; each prints 'RuntimeError: Event loop is closed' through
    sys.unraisablehook. Those say nothing the run's own error line does not."""
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
            return
        previous(unraisable)

    sys.unraisablehook = hook


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _quiet_closed_loop_errors()
    from trainers import configuration

    configuration.check_values(_CONFIG.value)  # before anything slow is imported or written
    # tf.data only: keep TensorFlow off the accelerators JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    _initialize_distributed()

    import trainers

    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        raise ConfigError(f'--workdir {_WORKDIR.value} exists and is not a directory.')
    config = _CONFIG.value
    from trainers import core

    cache = core.enable_compilation_cache(config.get('compilation_cache_dir'))
    if cache:
        logging.info('Compilation cache: %s (--config.compilation_cache_dir=\'\' turns it off).', cache)
    from trainers.workdir import RunOptions

    trainer = trainers.get_trainer(config.get('trainer', 'supervised'))
    trainer.train_and_evaluate(config, _WORKDIR.value,
                               options=RunOptions(allow_config_change=_ALLOW_CONFIG_CHANGE.value))


def _verbose(argv: list[str]) -> bool:
    if os.environ.get('FLAXNETS_VERBOSE', '').lower() not in ('', '0', 'false'):
        return True
    if flags.FLAGS.is_parsed():
        return _VERBOSE.value
    return any(a in ('--verbose', '--verbose=true', '--verbose=1') for a in argv)


def run(argv: list[str] | None = None) -> None:
    """app.run(main) with the handlers for how a run ends early: a user error prints its
    message and exits 2; an interrupted run that saved its checkpoint exits 75
    (EXIT_RESUMABLE: run the same command to resume); a second Ctrl-C exits 130."""
    argv = sys.argv if argv is None else argv
    from trainers.loop import EXIT_RESUMABLE, RunInterrupted

    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except RunInterrupted as e:
        logging.flush()
        print(f'train.py: {e}', file=sys.stderr, flush=True)
        sys.exit(EXIT_RESUMABLE)
    except KeyboardInterrupt:
        logging.flush()
        print('train.py: aborted by a second Ctrl-C; the newest saved checkpoint is where the '
              'next run resumes.', file=sys.stderr, flush=True)
        sys.exit(130)
    except UserError as e:
        if _verbose(argv):
            raise
        logging.flush()
        print(f'train.py: error: {e}', file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


if __name__ == '__main__':
    sys.path.insert(0, REPO)
    run()
