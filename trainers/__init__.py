"""Trainers, chosen by `config.trainer`: each exposes `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import difflib
import importlib

from flaxnets_errors import ConfigError

# name -> module; later trainers ('noisy_student', 'mpl') register here.
TRAINERS = {
    'supervised': 'trainers.supervised',
    'noisy_student': 'trainers.noisy_student',
    'mpl': 'trainers.meta_pseudo_labels',
}


def get_trainer(name: str):
    """The trainer module for `config.trainer`; an unknown name lists the known ones."""
    if name not in TRAINERS:
        close = difflib.get_close_matches(name, TRAINERS, n=1)
        hint = f' Did you mean {close[0]!r}?' if close else ''
        raise ConfigError(
            f'Unknown config.trainer {name!r}.{hint} Known trainers: {sorted(TRAINERS)}.'
        )
    return importlib.import_module(TRAINERS[name])
