"""Orbax checkpoints: async saves, keep-newest-N, resume, and a refusal to mix runs.

Each checkpoint holds two items: 'state' (the TrainState arrays, or any pytree of them)
and 'meta' (JSON: model name, parameter-shape fingerprint, data settings). On start a
trainer restores the newest checkpoint of its workdir; a workdir that holds a checkpoint
of a different model is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from flaxnets_errors import InputNotFoundError, UserError

# Meta keys whose mismatch means "this workdir belongs to another model": refused.
STRUCTURAL_KEYS = ('model', 'param_fingerprint')
# Meta keys whose change breaks exact data replay: allowed, but warned about.
REPLAY_KEYS = ('dataset', 'seed', 'batch_size')


class CheckpointMismatchError(UserError, RuntimeError):
    """The workdir holds a checkpoint that does not belong to this run."""


def tree_fingerprint(tree: Any) -> str:
    """A short digest of the tree's paths, shapes and dtypes (not its values)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    desc = [
        (jax.tree_util.keystr(p), tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', '')))
        for p, x in leaves
    ]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _drop_empty(tree: dict) -> dict:
    """Orbax stores no empty subtrees; we keep them out and put them back on restore."""
    return {k: v for k, v in tree.items() if not (isinstance(v, dict) and not v)}


class Checkpointer:
    """Thin layer over `ocp.CheckpointManager` for one workdir.

    Args:
      directory: where step folders go (`<workdir>/checkpoints`).
      meta: JSON-serializable facts about this run; see STRUCTURAL_KEYS/REPLAY_KEYS.
      max_to_keep: newest checkpoints kept.
      async_save: write in a background thread; `wait()` before reading or exiting.
    """

    def __init__(self, directory: str, meta: dict, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.meta = meta
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=('state', 'meta')
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored['meta'])

    def check_compatible(self, step: int) -> None:
        """Raises CheckpointMismatchError if checkpoint `step` is another model's."""
        theirs = self.read_meta(step)
        bad = [k for k in STRUCTURAL_KEYS if theirs.get(k) != self.meta.get(k)]
        if bad:
            diffs = ', '.join(f'{k}: checkpoint {theirs.get(k)!r} vs this run {self.meta.get(k)!r}' for k in bad)
            raise CheckpointMismatchError(
                f'The workdir checkpoints at {self.directory} (newest: step {step}) belong to a '
                f'different model ({diffs}). Nothing was overwritten. Use a new --workdir for '
                f'this model, or move that directory away to start over; to start from those '
                f'weights instead, fine-tune from them.'
            )
        changed = [k for k in REPLAY_KEYS if k in theirs and theirs.get(k) != self.meta.get(k)]
        if changed:
            logging.warning(
                'Resuming from step %d with changed %s: training continues, but the data order '
                'is no longer that of an uninterrupted run.',
                step,
                ', '.join(f'{k} ({theirs.get(k)!r} -> {self.meta.get(k)!r})' for k in changed),
            )

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        tree = _drop_empty(_as_dict(state))
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(self.meta)
            ),
            force=force,
        )

    def restore(self, step: int, target: Any) -> Any:
        """Restores into the structure, dtypes and shardings of `target` (arrays or
        `jax.ShapeDtypeStruct`s with `.sharding`)."""
        target_dict = _as_dict(target)
        kept = _drop_empty(target_dict)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), kept
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )['state']
        full = {k: restored.get(k, v) for k, v in target_dict.items()}
        return type(target)(**full) if hasattr(target, 'replace') else full

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes; a failed save has already been reported
        by the loop (trainers/loop.py), so errors here are logged, not raised."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - closing after a failed save
            logging.warning('Closing the checkpoint manager of %s: %s', self.directory,
                            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)


def _as_dict(state: Any) -> dict:
    if isinstance(state, dict):
        return dict(state)
    # flax.struct dataclasses
    return {f: getattr(state, f) for f in state.__dataclass_fields__}


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
    )


def load_state_arrays(directory: str, step: int | None = None) -> tuple[int, dict]:
    """Reads a checkpoint's 'state' item as host numpy arrays, without a target.

    For inspection, tests and restoring weights into another run (fine-tuning). Returns
    (step, state dict); `step=None` means the newest. Every array is read whole onto this
    process's first device, whatever sharding it was saved with, so each process of a
    multi-host job gets the full values (the saved sharding may name devices this process
    cannot address).
    """
    manager = _read_only_manager(directory)
    try:
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise InputNotFoundError(f'No checkpoint in {directory}.')
        if step not in manager.all_steps():
            raise InputNotFoundError(
                f'No checkpoint for step {step} in {directory} (steps there: {manager.all_steps()}).'
            )
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
            manager.item_metadata(step)['state'],
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return step, jax.tree.map(np.asarray, dict(restored['state']))
    finally:
        manager.close()


def load_checkpoint_meta(directory: str, step: int) -> dict:
    """A checkpoint's 'meta' item (model name, fingerprint, ...); {} when it has none."""
    manager = _read_only_manager(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored['meta'] or {})
    except (FileNotFoundError, KeyError, ValueError):
        return {}
    finally:
        manager.close()
