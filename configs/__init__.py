"""Experiment configs: one `get_config()` per file, run with `train.py --config`."""
