"""Runs the offline BiT demonstration: upstream on mnist5k, transfer to digits, tables.

    python tools/bit_demo.py all --root /tmp/flaxnets/bit_demo      # everything, then tables
    python tools/bit_demo.py upstream|transfer|batch --root ...       # one stage
    python tools/bit_demo.py table --root ...                         # tables from results

Stages (each run is skipped when its workdir already has results.json, so an interrupted
call resumes; every run's workdir is <root>/<name>):
- upstream: `configs/bit/mnist5k_upstream.py:{gn,bn}` for each seed -> up_{norm}_s{seed}.
- transfer: `configs/bit/digits_transfer.py:{norm},{shots}` for shots 1/5/10/full and
  three arms per seed: GN+WS from up_gn_s{seed}, GN+WS from scratch, BN from
  up_bn_s{seed} -> {arm}_{shots}_s{seed}.
- unscaled_lr: the transfer stage again with LR 0.003 at batch 64 (not scaled down to
  0.000375) -> lr0.003/{arm}_{shots}_s{seed}.
- batch: per-device batch 1 vs 8 (`train.py` subprocesses on 8 fake CPU devices), and
  GN vs BN at global batch 1 on one device; see `BATCH_RUNS`.
Upstream and transfer runs share this process (no start-up per run); one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHOTS = ('1', '5', '10', 'full')
ARMS = {  # arm -> (norm, pretrained)
    'gn_pretrained': ('gn', True),
    'gn_scratch': ('gn', False),
    'bn_pretrained': ('bn', True),
}

# Batch-size independence on mnist5k with the demonstration's network: two epochs
# (8,000 images) each, LR 0.03 x batch / 256 (BiT's rule), warmup over the first 17.8 %.
BATCH_RUNS = {
    # name: (norm, devices, global batch)
    'gn_8dev_b8': ('gn', 8, 8),  # 1 image per device
    'gn_8dev_b64': ('gn', 8, 64),  # 8 images per device
    'gn_1dev_b1': ('gn', 1, 1),
    'bn_1dev_b1': ('bn', 1, 1),
    'bn_8dev_b8': ('bn', 8, 8),
}
BATCH_EPOCHS = 2


def _done(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, 'results.json'))


def _train(config, workdir: str) -> None:
    from trainers import supervised

    if _done(workdir):
        print(f'skip {workdir} (done)', flush=True)
        return
    print(f'=== {workdir}', flush=True)
    supervised.train_and_evaluate(config, workdir)


def upstream(root: str, seeds: list[int]) -> None:
    from configs.bit import mnist5k_upstream

    for seed in seeds:
        for norm in ('gn', 'bn'):
            config = mnist5k_upstream.get_config(norm)
            config.seed = seed
            _train(config, os.path.join(root, f'up_{norm}_s{seed}'))


def transfer(root: str, seeds: list[int]) -> None:
    from configs.bit import digits_transfer

    for seed in seeds:
        for shots in SHOTS:
            for arm, (norm, pretrained) in ARMS.items():
                config = digits_transfer.get_config(f'{norm},{shots}')
                config.seed = seed
                if pretrained:
                    config.init_from = os.path.join(root, f'up_{norm}_s{seed}')
                _train(config, os.path.join(root, f'{arm}_{shots}_s{seed}'))


def unscaled_lr(root: str, seeds: list[int]) -> None:
    """The transfer table again with the HyperRule's LR 0.003 used as is at batch 64 (BiT's
    released code keeps 0.003, at batch 512) instead of 0.003 x 64 / 512."""
    from configs.bit import digits_transfer

    for seed in seeds:
        for shots in SHOTS:
            for arm, (norm, pretrained) in ARMS.items():
                config = digits_transfer.get_config(f'{norm},{shots}')
                config.seed = seed
                config.lr_base_batch_size = 0  # 0.003 at batch 64
                if pretrained:
                    config.init_from = os.path.join(root, f'up_{norm}_s{seed}')
                _train(config, os.path.join(root, 'lr0.003', f'{arm}_{shots}_s{seed}'))


def batch(root: str) -> None:
    from configs.bit import mnist5k_upstream

    for name, (norm, devices, global_batch) in BATCH_RUNS.items():
        workdir = os.path.join(root, 'batch', name)
        if _done(workdir):
            print(f'skip {workdir} (done)', flush=True)
            continue
        steps = BATCH_EPOCHS * mnist5k_upstream.TRAIN_IMAGES // global_batch
        boundaries = ','.join(str(round(f * steps)) for f in mnist5k_upstream.DECAY_FRACTIONS)
        args = [
            sys.executable, os.path.join(REPO, 'train.py'),
            '--config', f'{REPO}/configs/bit/mnist5k_upstream.py:{norm}', '--workdir', workdir,
            f'--config.batch_size={global_batch}', f'--config.num_train_steps={steps}',
            f'--config.schedule.warmup_steps={round(mnist5k_upstream.WARMUP_FRACTION * steps)}',
            f'--config.schedule.boundaries=({boundaries})',
            f'--config.log_every_steps={max(steps // 20, 1)}',
            f'--config.eval_every_steps={steps}', f'--config.checkpoint_every_steps={steps}',
            '--config.eval_batch_size=200',  # divisible by 8 devices
        ]
        env = dict(os.environ, JAX_PLATFORMS='cpu',
                   XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
        print(f'=== {workdir}', flush=True)
        subprocess.run(args, env=env, cwd=REPO, check=True)


def _top1(workdir: str) -> float | None:
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return 100.0 * json.load(f)['top1']


def _cell(values: list[float]) -> str:
    if not values:
        return '–'
    mean = np.mean(values)
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    runs = ', '.join(f'{v:.2f}' for v in values)
    return f'{mean:.2f} ± {std:.2f} % ({runs})'


def _transfer_table(root: str, seeds: list[int]) -> list[str]:
    names = {
        'gn_pretrained': 'GN+WS, pre-trained on mnist5k',
        'gn_scratch': 'GN+WS, from scratch',
        'bn_pretrained': 'BN twin, pre-trained on mnist5k',
    }
    lines = ['| arm | ' + ' | '.join(
        f'{s} per class' if s != 'full' else 'full (1,397)' for s in SHOTS) + ' |',
        '|---|' + '---|' * len(SHOTS)]
    for arm in ARMS:
        cells = []
        for shots in SHOTS:
            vals = [_top1(os.path.join(root, f'{arm}_{shots}_s{s}')) for s in seeds]
            cells.append(_cell([v for v in vals if v is not None]))
        lines.append(f'| {names[arm]} | ' + ' | '.join(cells) + ' |')
    return lines


def table(root: str, seeds: list[int]) -> str:
    lines = ['Transfer, LR 0.003 x 64 / 512 (configs/bit/digits_transfer.py as is):']
    lines += _transfer_table(root, seeds)
    lines += ['', 'Transfer, LR 0.003 at batch 64 (stage unscaled_lr):']
    lines += _transfer_table(os.path.join(root, 'lr0.003'), seeds)
    up = []
    for norm in ('gn', 'bn'):
        vals = [_top1(os.path.join(root, f'up_{norm}_s{s}')) for s in seeds]
        up.append(f'upstream {norm}: {_cell([v for v in vals if v is not None])}')
    lines += ['', 'mnist5k test top-1 of the pre-trained networks: ' + '; '.join(up)]
    runs = []
    for name in BATCH_RUNS:
        v = _top1(os.path.join(root, 'batch', name))
        if v is not None:
            runs.append(f'{name}: {v:.2f} %')
    if runs:
        lines += ['', 'batch runs (mnist5k test top-1): ' + '; '.join(runs)]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'stage', choices=('all', 'upstream', 'transfer', 'unscaled_lr', 'batch', 'table'))
    parser.add_argument('--root', default='/tmp/flaxnets/bit_demo')
    parser.add_argument('--seeds', default='0,1,2')
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(',')]
    if args.stage in ('all', 'upstream', 'transfer', 'unscaled_lr'):
        import tensorflow as tf

        tf.config.set_visible_devices([], 'GPU')
    from absl import logging

    logging.set_verbosity(logging.INFO)
    # Seed by seed, so the first complete rows of the table come early.
    for seed in seeds:
        if args.stage in ('all', 'upstream'):
            upstream(args.root, [seed])
        if args.stage in ('all', 'transfer'):
            transfer(args.root, [seed])
    if args.stage in ('all', 'unscaled_lr'):
        unscaled_lr(args.root, seeds)
    if args.stage in ('all', 'batch'):
        batch(args.root)
    print(table(args.root, seeds))


if __name__ == '__main__':
    main()
