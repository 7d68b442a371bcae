"""Errors a user causes and can fix: the marker base class every such error shares.

An error of this kind means the command, the config or the files it points at are wrong
(an unknown model, dataset or config key, a value that cannot work, a missing dataset or
weights file, weights that do not fit the model, a workdir that belongs to another run).
Its message names the cause and the fix, so `train.py` prints just the message and exits
with status 2; `--verbose` or `FLAXNETS_VERBOSE=1` shows the traceback too. Any other
exception is a bug and keeps its traceback.

The specific errors live next to the code that raises them (`models.UnknownModelError`,
`models.ConversionError`, `input_pipeline.DatasetNotAvailableError`,
`trainers.finetune.WeightsFileError`, `trainers.checkpointing.CheckpointMismatchError`,
...) and derive from `UserError` as well as from the builtin type they always had, so
existing `except ValueError` code keeps working. This module sits at the top level
because `models`, `input_pipeline` and `trainers` all raise such errors and none of them
imports another's package for that.
"""

from __future__ import annotations


class UserError(Exception):
    """Marker base: the user caused this error and its message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work (named in the message, with valid choices)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory the run was pointed at does not exist or holds nothing usable."""
