"""Training and evaluation curves of one or several runs, on one figure.

    python tools/plot.py /tmp/flaxnets/default                   # -> curves.png + curves.svg
    python tools/plot.py RUN_A RUN_B --output docs/compare.png   # runs side by side

Each argument is a workdir (or its `metrics.jsonl`): one JSON object per logged step with
`step`, `split` and the metric values (trainers/metrics_io.py). Four panels: loss and
top-1 (training: solid; each evaluation split, e.g. `test` or `test_ema`: dashed with
markers), learning rate, and training images/s. A run is one colour, labelled by its
workdir's name (with as many parent directories as it takes to tell runs apart). Rows a
resumed run logged twice for the same step and split count once (the later one).
Noisy Student writes one workdir per round and model: plot those
(`WORKDIR/round_0/student`, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

TRAIN = 'train'
# (metric key, panel title, splits: 'train' | 'eval' | 'all', y scale)
PANELS = (
    ('loss', 'loss', 'all', 'log'),
    ('top1', 'top-1 accuracy', 'all', 'linear'),
    ('lr', 'learning rate', 'train', 'linear'),
    ('images_per_sec', 'training images/s', 'train', 'linear'),
)
EVAL_STYLES = ('--', ':', '-.')


class MetricsError(Exception):
    """A workdir without readable metrics (the message names the path)."""


def metrics_path(path: str) -> str:
    """`path` itself if it is a file, else `path/metrics.jsonl`."""
    return path if os.path.isfile(path) else os.path.join(path, 'metrics.jsonl')


def load_metrics(path: str) -> list[dict]:
    """The rows of a workdir's `metrics.jsonl`, one per (split, step), sorted by step.

    Raises:
      MetricsError: the file is missing, unreadable or holds no rows.
    """
    file = metrics_path(path)
    if not os.path.isfile(file):
        raise MetricsError(f'{path}: no metrics.jsonl there (is it a flaxnets workdir?).')
    rows: dict[tuple[str, int], dict] = {}
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[(row['split'], int(row['step']))] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                # The writer flushes whole lines; only a crash mid-write leaves a bad last line.
                raise MetricsError(f'{file}:{n}: not a metrics row ({e}).') from e
    if not rows:
        raise MetricsError(f'{file} holds no metrics yet.')
    return sorted(rows.values(), key=lambda r: (r['step'], r['split']))


def run_labels(paths: Sequence[str]) -> list[str]:
    """Workdir names, lengthened by parent directories until they are distinct."""
    parts = [
        os.path.normpath(os.path.abspath(os.path.dirname(p) if os.path.isfile(p) else p)).split(os.sep)
        for p in paths
    ]
    depth = 1
    while True:
        labels = ['/'.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def _series(rows: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if r['split'] == split and isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r['step'])
            ys.append(float(v))
    return xs, ys


def make_figure(runs: dict[str, list[dict]]) -> Figure:
    """One figure, one panel per metric of :data:`PANELS`, one line per run and split.

    Args:
      runs: run label -> rows (as :func:`load_metrics` returns them), in legend order.

    Every line's gid is `'<run label>|<split>'`, so callers can find the line of a run.
    """
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), layout='constrained')
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    eval_splits = sorted({r['split'] for rows in runs.values() for r in rows} - {TRAIN})
    styles = {s: EVAL_STYLES[i % len(EVAL_STYLES)] for i, s in enumerate(eval_splits)}
    for ax, (key, title, which, scale) in zip(axes.flat, PANELS, strict=True):
        splits = [TRAIN] if which == 'train' else [TRAIN, *eval_splits]
        for i, (label, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            for split in splits:
                xs, ys = _series(rows, split, key)
                if not xs:
                    continue
                if split == TRAIN:
                    ax.plot(xs, ys, color=color, lw=1.6, gid=f'{label}|{split}')
                else:
                    ax.plot(xs, ys, color=color, ls=styles[split], marker='o', ms=4, lw=1.2,
                            gid=f'{label}|{split}')
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        if not ax.get_lines():
            ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes,
                    color='0.5')
        elif scale == 'log' and all(min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale('log')
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2, label=label)
               for i, label in enumerate(runs)]
    handles.append(Line2D([], [], color='0.3', lw=1.6, label='train'))
    handles += [Line2D([], [], color='0.3', ls=styles[s], marker='o', ms=4, label=s)
                for s in eval_splits]
    fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 6),
               frameon=False)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description='Plot loss, top-1, learning rate and images/s of flaxnets runs.')
    parser.add_argument('workdirs', nargs='+', help='run directories (or their metrics.jsonl)')
    parser.add_argument('--output', default='curves.png',
                        help='image file to write (default: curves.png); see --formats')
    parser.add_argument('--formats', default='png,svg',
                        help='comma-separated formats written next to each other, the '
                             'extension of --output replaced (default: png,svg)')
    parser.add_argument('--dpi', type=int, default=110, help='PNG resolution (default: 110)')
    args = parser.parse_args(argv)
    try:
        runs = dict(zip(run_labels(args.workdirs), map(load_metrics, args.workdirs), strict=True))
    except MetricsError as e:
        print(f'plot.py: error: {e}', file=sys.stderr)
        return 2
    fig = make_figure(runs)
    stem = os.path.splitext(args.output)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for fmt in (f.strip().lower() for f in args.formats.split(',') if f.strip()):
        path = f'{stem}.{fmt}'
        fig.savefig(path, dpi=args.dpi)
        print(path)
    plt.close(fig)
    return 0


if __name__ == '__main__':
    sys.exit(main())
