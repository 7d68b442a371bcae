"""Where metrics go: `metrics.jsonl`, TensorBoard (clu writers) and the console.

Only process 0 writes files. Every record of `metrics.jsonl` is one JSON object with
`step`, `split`, the metric values (fractions for accuracies) and `wall_time` (seconds
since the run started), so scripts can read results without TensorBoard.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any

import jax
from absl import logging
from clu import metric_writers


def _plain(v: Any) -> Any:
    if hasattr(v, 'item'):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the record readable
    return v


class MetricsLogger:
    """Writes metric records for one run.

    Args:
      workdir: run directory (`metrics.jsonl` and TensorBoard events go there).
      total_steps: for the ETA.
      global_batch_size: for images/s.
    """

    def __init__(self, workdir: str, *, total_steps: int, global_batch_size: int):
        self.workdir = workdir
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.is_main = jax.process_index() == 0
        self.start = time.time()
        self._last_time = None
        self._last_step = None
        if self.is_main:
            os.makedirs(workdir, exist_ok=True)
            # TensorBoard only: the console line is written by write_train/write_eval.
            self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
            self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
        else:
            self._writer = None
            self._jsonl = None

    def drop_after(self, step: int) -> None:
        """Removes the records past `step` (a resumed run logs them again from there), so
        `metrics.jsonl` holds every step once."""
        if not self.is_main:
            return
        path = os.path.join(self.workdir, 'metrics.jsonl')
        self._jsonl.close()
        kept, dropped = [], 0
        with open(path) as f:
            for line in f:
                try:
                    keep = int(json.loads(line)['step']) <= step
                except (ValueError, KeyError, TypeError):
                    keep = False  # a line cut short by a crash
                if keep:
                    kept.append(line if line.endswith('\n') else line + '\n')
                else:
                    dropped += 1
        if dropped:
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.writelines(kept)
            os.replace(tmp, path)
            logging.info('Dropped %d metrics records past step %d (they are logged again).', dropped, step)
        self._jsonl = open(path, 'a')

    def total(self, key: str, split: str, up_to_step: int) -> int:
        """Sum of `key` over this file's `split` records up to a step (process 0; 0 elsewhere)."""
        path = os.path.join(self.workdir, 'metrics.jsonl')
        if not self.is_main or not os.path.exists(path):
            return 0
        self._jsonl.flush()
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return int(sum(r.get(key, 0) for r in rows if r.get('split') == split and r['step'] <= up_to_step))

    def flush(self) -> None:
        if self.is_main:
            self._jsonl.flush()
            self._writer.flush()

    def mark(self, step: int) -> None:
        """Starts the throughput clock at `step` (after compilation, after a resume)."""
        self._last_time, self._last_step = time.time(), step

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {'step': int(step), 'split': split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        record['wall_time'] = round(time.time() - self.start, 3)
        if self.is_main:
            self._jsonl.write(json.dumps(record) + '\n')
            self._jsonl.flush()
            scalars = {
                f'{split}/{k}': v for k, v in record.items()
                if k not in ('step', 'split', 'wall_time') and isinstance(v, (int, float))
            }
            self._writer.write_scalars(int(step), scalars)
        return record

    def write_train(self, step: int, metrics: dict[str, Any]) -> None:
        """A train record plus throughput, and one console line."""
        now = time.time()
        extra = {}
        if self._last_time is not None and step > self._last_step:
            steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
            extra = {
                'steps_per_sec': round(steps_per_s, 3),
                'images_per_sec': round(steps_per_s * self.global_batch_size, 1),
            }
            eta = datetime.timedelta(seconds=int((self.total_steps - step) / max(steps_per_s, 1e-9)))
        else:
            eta = None
        self._last_time, self._last_step = now, step
        record = self.write(step, 'train', {**metrics, **extra})
        parts = [f'step {step}/{self.total_steps}']
        for k in ('loss', 'top1', 'lr', 'grad_norm'):
            if k in record and isinstance(record[k], float):
                parts.append(f'{k} {record[k]:.4g}')
        if extra:
            parts.append(f"{extra['steps_per_sec']:.2f} steps/s")
            parts.append(f"{extra['images_per_sec']:.0f} img/s")
            parts.append(f'ETA {eta}')
        logging.info(' | '.join(parts))

    def write_eval(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        self.write(step, split, metrics)
        logging.info(
            '[%s] step %d | loss %.4f | top1 %.4f | top5 %.4f | %d examples',
            split, step, metrics['loss'], metrics['top1'], metrics['top5'], metrics['num_examples'],
        )

    def write_results(self, results: dict[str, Any]) -> None:
        """`results.json` (atomically) and the final console line."""
        logging.info('Final results: %s', json.dumps(results))
        if self.is_main:
            path = os.path.join(self.workdir, 'results.json')
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(results, f, indent=2, sort_keys=True)
            os.replace(tmp, path)

    def close(self) -> None:
        if self.is_main:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()
