"""Long runs lose nothing: each fault driven the way it happens, on LeNet-5 / mnist5k.

Subprocess `train.py` runs get real signals (SIGINT, SIGTERM), a second run on a busy
workdir, a changed config, impossible values and a real full disk (a small tmpfs); the
in-process tests damage real checkpoint files and check the one loop's bookkeeping.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, REPO, read_jsonl, run_train, small_config

from trainers import loop, supervised
from trainers.checkpointing import load_state_arrays
from trainers.workdir import LOCK_FILE, WorkdirLockedError, acquire_lock


def _args(data_dir: str, workdir: str, **overrides) -> list[str]:
    args = [f'--config={os.path.join(REPO, "configs", "default.py")}', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.batch_size=16',
            '--config.eval_batch_size=500', '--config.schedule.warmup_steps=2']
    return args + [f'--config.{k}={v}' for k, v in overrides.items()]


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_train_rows(workdir: str, proc: subprocess.Popen, rows: int, timeout: float = 240) -> None:
    """Waits until the run has logged `rows` train records (it is past compilation)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path) and sum(r['split'] == 'train' for r in read_jsonl(path)) >= rows:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f'no {rows} train rows within {timeout} s')


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith('train.py:')]


def test_interrupts_lock_and_config_history(data_dir, tmp_path):
    """Ctrl-C and SIGTERM save and exit 75; a second run on the busy workdir is refused;
    a resume that changes the batch size is refused; the run then completes with every
    step logged once and the losses of an uninterrupted run."""
    workdir = str(tmp_path / 'run')
    # Long enough that the signals land inside the loop (LeNet-5 steps take milliseconds).
    # A constant LR, so that shortening the run at the end changes no earlier step.
    overrides = {'num_train_steps': 100_000, 'log_every_steps': 2, 'eval_every_steps': 100_000,
                 'checkpoint_every_steps': 100_000, 'schedule.name': 'constant'}
    first = _start(_args(data_dir, workdir, **overrides))
    _wait_for_train_rows(workdir, first, 2)
    # A second run on the same workdir stops at once, naming the holder.
    second = run_train(_args(data_dir, workdir, **overrides), check=False, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f'in use by another run: pid {first.pid}' in second.stderr
    first.send_signal(signal.SIGINT)
    code, err = _finish(first)
    assert code == loop.EXIT_RESUMABLE, err[-3000:]
    assert 'run the same command to resume' in _error_lines(err)[-1] and 'Traceback' not in err
    saved, _ = load_state_arrays(os.path.join(workdir, 'checkpoints'))
    assert 4 <= saved < 100_000 and not os.path.exists(os.path.join(workdir, LOCK_FILE))

    # A resume that would change the data order is refused, config.json untouched.
    changed = run_train(_args(data_dir, workdir, **{**overrides, 'batch_size': 32}), check=False)
    assert changed.returncode == 2
    assert 'changed: batch_size (16 -> 32)' in changed.stderr and '--allow_config_change' in changed.stderr
    assert json.load(open(os.path.join(workdir, 'config.json')))['batch_size'] == 16

    # Preempted again (SIGTERM), then resumed to the end (a shorter run: a harmless change).
    again = _start(_args(data_dir, workdir, **overrides))
    _wait_for_train_rows(workdir, again, saved // 2 + 2)
    again.send_signal(signal.SIGTERM)
    code, err = _finish(again)
    assert code == loop.EXIT_RESUMABLE and 'SIGTERM received' in err, err[-3000:]
    second_save, _ = load_state_arrays(os.path.join(workdir, 'checkpoints'))
    assert second_save > saved
    total = second_save + 4
    done = run_train(_args(data_dir, workdir, **{**overrides, 'num_train_steps': total}))
    assert done.returncode == 0
    assert sorted(os.listdir(os.path.join(workdir, 'history'))) == [
        'config.0.json', f'config.{saved}.json', f'config.{second_save}.json']

    rows = [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if r['split'] == 'train']
    steps = [r['step'] for r in rows]
    assert steps == sorted(set(steps)), 'a step was logged twice'
    # The same run without interruptions, in this process, logs the same losses.
    straight = str(tmp_path / 'straight')
    config = small_config(data_dir, eval_batch_size=500, **{**overrides, 'num_train_steps': total})
    supervised.train_and_evaluate(config, straight)
    ref = {r['step']: r['loss'] for r in read_jsonl(os.path.join(straight, 'metrics.jsonl'))
           if r['split'] == 'train'}
    # Rows at an interruption step, and the first after it when that was odd, average
    # fewer steps than the uninterrupted run's; compare all the others.
    cuts = (saved, second_save)
    common = [s for s in steps if s % 2 == 0 and s not in cuts and s - 1 not in cuts]
    assert common and all(s in ref for s in common)
    np.testing.assert_allclose([r['loss'] for r in rows if r['step'] in common],
                               [ref[s] for s in common], rtol=1e-5)
    _, a = load_state_arrays(os.path.join(workdir, 'checkpoints'), total)
    _, b = load_state_arrays(os.path.join(straight, 'checkpoints'), total)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT
    with loop.Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.reason == 'SIGINT received'
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is before


def test_impossible_values_are_refused_before_any_work(data_dir, tmp_path):
    workdir = str(tmp_path / 'never')
    proc = run_train(_args(data_dir, workdir, batch_size=-1, learning_rate=0.0,
                           **{'optimizer.name': 'adamx'}), check=False, timeout=300)
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)
    assert 'config.batch_size=-1 (must be an integer >= 1)' in line
    assert 'config.learning_rate=0.0 (must be a number in (0.0, inf))' in line
    assert "config.optimizer.name='adamx' (must be one of sgd" in line
    assert not os.path.exists(workdir) and 'Traceback' not in proc.stderr


def _damage(workdir: str, step: int, how: str) -> None:
    state = os.path.join(workdir, 'checkpoints', str(step), 'state')
    if how == 'truncate':
        files = [f for f in glob.glob(os.path.join(state, '**', 'd', '*'), recursive=True)]
        assert files
        for f in files:
            with open(f, 'r+b') as fh:
                fh.truncate(os.path.getsize(f) // 2)
    else:
        os.remove(os.path.join(state, '_METADATA'))


def test_damaged_checkpoints_are_moved_aside_and_older_ones_used(data_dir, tmp_path):
    kw = dict(num_train_steps=6, checkpoint_every_steps=2, log_every_steps=2, eval_every_steps=100,
              keep_checkpoints=3)
    ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
    supervised.train_and_evaluate(small_config(data_dir, **{**kw, 'num_train_steps': 8}), ref)
    supervised.train_and_evaluate(small_config(data_dir, **kw), run)
    assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['2', '4', '6']
    _damage(run, 6, 'truncate')
    _damage(run, 4, 'metadata')
    supervised.train_and_evaluate(small_config(data_dir, **{**kw, 'num_train_steps': 8}), run)
    names = sorted(os.listdir(os.path.join(run, 'checkpoints')))
    assert [n.split('-')[:2] for n in names if n.startswith('damaged')] == [['damaged', '4'], ['damaged', '6']]
    # Resumed from step 2, so it ends exactly where the uninterrupted run does.
    _, a = load_state_arrays(os.path.join(run, 'checkpoints'), 8)
    _, b = load_state_arrays(os.path.join(ref, 'checkpoints'), 8)
    chex.assert_trees_all_equal(a, b)
    steps = [r['step'] for r in read_jsonl(os.path.join(run, 'metrics.jsonl')) if r['split'] == 'train']
    assert steps == [2, 4, 6, 8], steps  # rows past the restored step were dropped, then logged again

    # When nothing restores, the run stops, listing each checkpoint and why.
    for step in (4, 6, 8):
        _damage(run, step, 'metadata')
    with pytest.raises(loop.NoRestorableCheckpointError, match=r'step 8 .*step 6 .*step 4 '):
        supervised.train_and_evaluate(small_config(data_dir, **{**kw, 'num_train_steps': 10}), run)
    assert len([n for n in os.listdir(os.path.join(run, 'checkpoints')) if n.startswith('damaged')]) == 5


def test_stale_lock_is_taken_over_and_a_live_one_refused(data_dir, tmp_path):
    workdir = str(tmp_path / 'run')
    os.makedirs(workdir)
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
            json.dump({'host': os.uname().nodename, 'pid': holder.pid, 'start_time': 'then'}, f)
        with pytest.raises(WorkdirLockedError, match=f'pid {holder.pid} on host'):
            acquire_lock(workdir)
    finally:
        holder.kill()
        holder.wait()
    path = acquire_lock(workdir)  # the holder is gone: taken over
    assert json.load(open(path))['pid'] == os.getpid()


def test_failed_continuation_leaves_no_stale_results(data_dir, tmp_path, monkeypatch):
    import input_pipeline

    workdir = str(tmp_path / 'run')
    supervised.train_and_evaluate(small_config(data_dir, num_train_steps=4, eval_every_steps=4), workdir)
    assert json.load(open(os.path.join(workdir, 'results.json')))['step'] == 4
    original = input_pipeline.create_train_iterator

    def broken(*args, **kwargs):
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 2:
                raise RuntimeError('disk went away')
            yield batch

    monkeypatch.setattr(input_pipeline, 'create_train_iterator', broken)
    with pytest.raises(RuntimeError, match='disk went away'):
        supervised.train_and_evaluate(small_config(data_dir, num_train_steps=8, eval_every_steps=8), workdir)
    assert not os.path.exists(os.path.join(workdir, 'results.json'))
    assert json.load(open(os.path.join(workdir, 'history', 'results.4.json')))['step'] == 4


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / 'disk'
    mount.mkdir()
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
    try:
        yield str(mount)
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=False)


def test_full_disk_stops_at_the_failed_save(data_dir, small_disk):
    workdir = os.path.join(small_disk, 'run')
    # Fill the disk so that the run's small files fit but a checkpoint does not.
    with open(os.path.join(small_disk, 'filler'), 'wb') as f:
        f.write(b'\0' * (2 * 2**20 - 192 * 1024))
    proc = run_train(_args(data_dir, workdir, num_train_steps=20, log_every_steps=1,
                           checkpoint_every_steps=4, eval_every_steps=100),
                    check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert 'No space left on device' in line and 'MiB free' in line and 'checkpoint of step 4' in line
    assert 'Traceback' not in proc.stderr and len(proc.stderr.splitlines()) < 60, proc.stderr
    assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))
    rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    assert max(r['step'] for r in rows) <= 5  # no training past the failed save


def test_signal_on_one_process_stops_both_at_one_step(data_dir, tmp_path):
    """Two processes (jax.distributed on 127.0.0.1): SIGTERM to process 1 only; both save
    the same step and exit 75."""
    from conftest import free_port

    workdir = str(tmp_path / 'run')
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f'{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=2',
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    args = _args(data_dir, workdir, num_train_steps=100_000, log_every_steps=4,
                 eval_every_steps=100_000, checkpoint_every_steps=100_000)
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'train.py'), *args, f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        _wait_for_train_rows(workdir, procs[0], 2)
        procs[1].send_signal(signal.SIGTERM)
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for code, err in results:
        assert code == loop.EXIT_RESUMABLE, err[-3000:]
    assert 'SIGTERM received' in results[1][1] and 'signal on another process' in results[0][1]
    steps = {int(_error_lines(err)[-1].split('stopped at step ')[1].split()[0]) for _, err in results}
    saved, _ = load_state_arrays(os.path.join(workdir, 'checkpoints'))
    assert steps == {saved} and saved % 4 == 0  # agreed at a log step


def _folder_with_bad_files(root) -> str:
    """root/{train,val}/{a,b}/ with good JPEGs, plus a truncated JPEG and a 0-byte file in
    train and a text file named .jpg in val."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, 'JPEG')
        return buf.getvalue()

    for split, n in (('train', 8), ('val', 4)):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f'{i}.jpg').write_bytes(jpeg())
    whole = jpeg()
    (root / 'train' / 'a' / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
    (root / 'train' / 'b' / 'empty.jpg').write_bytes(b'')
    (root / 'val' / 'b' / 'notes.jpg').write_text('not an image\n')
    return f'folder:{root}'


def test_bad_images_are_skipped_counted_and_named(tmp_path, caplog):
    dataset = _folder_with_bad_files(tmp_path / 'data')
    config = small_config('', dataset=dataset, train_split='train', eval_split='val', image_size=32,
                          batch_size=6, eval_batch_size=4, num_train_steps=6, log_every_steps=3,
                          eval_every_steps=6, checkpoint_every_steps=6, **{'data.max_bad_fraction': 0.2})
    config.data.data_dir = None
    workdir = str(tmp_path / 'run')
    with caplog.at_level('WARNING'):
        results = supervised.train_and_evaluate(config, workdir)
    # 2 of 18 train files are bad: 36 examples drawn over 6 steps (two epochs) skip 4.
    assert results['skipped_examples'] == 4
    rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    assert sum(r['skipped'] for r in rows if r['split'] == 'train') == 4
    assert results['num_examples'] == 8  # the val text file is left out of the metrics
    for name in ('cut.jpg', 'empty.jpg', 'notes.jpg'):
        assert name in caplog.text
    # Past the limit the run stops before training, naming the files.
    config.data.max_bad_fraction = 0.05
    from flaxnets_errors import UserError

    with pytest.raises(UserError, match='cut.jpg|empty.jpg'):
        supervised.train_and_evaluate(config, str(tmp_path / 'strict'))
    assert not os.path.exists(str(tmp_path / 'strict'))


def test_orbax_writer_task_errors_are_left_to_the_loops_line():
    """Under load, asyncio reports each failed orbax writer task ('Task exception was
    never retrieved') with a stack; the loop's one line already says it all."""
    import logging as logging_std

    import train

    def raised_from(filename):
        namespace = {}
        exec(compile('def write():\n    raise OSError(28, "No space left on device")\n',
                     filename, 'exec'), namespace)
        try:
            namespace['write']()
        except OSError:
            return sys.exc_info()

    def record(logger, exc_info, level=logging_std.ERROR):
        return logging_std.LogRecord(logger, level, '/usr/lib/python3/asyncio/base_events.py',
                                     1, 'Task exception was never retrieved', (), exc_info)

    quiet = train._QuietLibraries()
    orbax_error = raised_from('/venv/site-packages/orbax/checkpoint/serialization.py')
    assert not quiet.filter(record('asyncio', orbax_error))
    # Anything else asyncio or our own code reports still shows.
    assert quiet.filter(record('asyncio', raised_from('/work/trainers/loop.py')))
    assert quiet.filter(record('absl', orbax_error))
    assert quiet.filter(record('asyncio', None))
