"""Shared fixtures: a prepared offline data dir and small configs built from real ones."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compilation, not arithmetic, dominates these tests on a 2-core CPU (XLA:CPU spends ~30 s
# optimising ResNet-18's init). Every compiled function here runs a handful of times, so
# trade run time for compile time. Set before JAX is imported; subprocesses inherit it.
FAST_COMPILE = {
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
    'xla_cpu_use_fusion_emitters': False,
}
FAST_COMPILE_FLAGS = ' '.join(f'--{k}={str(v).lower()}' for k, v in FAST_COMPILE.items())
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE_FLAGS).strip()

# The regular torch build ships triton, whose native library crashes the interpreter when
# it loads after TensorFlow's (`import tensorflow; import timm` segfaults; the other order
# is fine). The parity tests need timm and the pipeline tests TensorFlow in one session,
# so load the reference libraries first. They are optional: without the [test] extra the
# parity tests skip themselves.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401
    import torchvision  # noqa: F401
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    """A tfds data dir with mnist5k prepared once for the whole session."""
    import input_pipeline

    path = str(tmp_path_factory.mktemp('tfds'))
    input_pipeline.get_dataset_info('mnist5k', path)
    return path


def small_config(data_dir: str, **overrides):
    """configs/default.py shrunk for tests; `overrides` set top-level or dotted keys."""
    from configs import default

    config = default.get_config()
    config.data.data_dir = data_dir
    config.num_train_steps = 10
    config.batch_size = 16
    config.eval_batch_size = 300  # does not divide the 1,000 test digits: tests padding
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 5
    config.schedule.warmup_steps = 2
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_train(args: list[str], *, devices: int = 1, timeout: int = 300, check: bool = True):
    """Runs train.py in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f'{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}',
        JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='2',
        PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''),
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return proc


def run_train_multiprocess(args: list[str], *, num_processes: int = 2, devices: int = 2,
                           timeout: int = 300) -> list[str]:
    """Runs train.py as `num_processes` processes on 127.0.0.1 (jax.distributed, gloo),
    each with `devices` fake CPU devices; returns their outputs, failing if any failed."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f'{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}',
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    procs = [
        subprocess.Popen(
            [sys.executable, 'train.py', *args, f'--coordinator_address=127.0.0.1:{port}',
             f'--num_processes={num_processes}', f'--process_id={i}'],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + timeout
    outs, timed_out = [], False
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            outs.append(p.communicate()[0])
    for p in procs:
        p.kill()
    if timed_out or any(p.returncode != 0 for p in procs):
        why = f'timed out after {timeout} s' if timed_out else 'failed'
        raise AssertionError(f'{num_processes}-process train.py {why}:\n' + '\n'.join(
            f'--- process {i} (exit {p.returncode}):\n{(o or "")[-3000:]}'
            for i, (p, o) in enumerate(zip(procs, outs, strict=True))))
    return outs
