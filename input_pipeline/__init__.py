"""Data for flaxnets: tfds datasets and image folders, preprocessed and batched.

Public API:
    default_data_config()      the `config.data` fields and their defaults.
    get_dataset_info(...)      classes, split sizes and image shape of a dataset.
    create_train_iterator(...) endless, exactly resumable training batches.
    create_eval_iterator(...)  one padded pass over a split, with 'mask'.
    DatasetInfo, DatasetNotAvailableError.

Importing this package registers two offline tfds datasets, `mnist5k` and
`digits` (see `builders.py`), which prepare themselves on first use.

Datasets are named like tfds names (`'cifar10'`, `'imagenet2012'`,
`'mnist5k'`) or `'folder:/path/to/root'` for root/<split>/<class_name>/*.jpg|png
(classes sorted by name; a corrupt file fails with an error naming it). See
`pipeline.py` for the determinism guarantees.
"""

from input_pipeline import builders as _builders  # noqa: F401  (registers the datasets)
from input_pipeline import sources
from input_pipeline.config import default_data_config
from input_pipeline.pipeline import create_eval_iterator, create_train_iterator
from input_pipeline.sources import (
    ArraySource,
    DatasetInfo,
    DatasetNotAvailableError,
    per_class_indices,
)


def load_source(data_config, dataset: str, split: str) -> ArraySource:
    """A whole split held in host memory for random access (subsets, pseudo-labels).

    Args:
        data_config: `config.data` (its `data_dir` and `download` are used).
        dataset: tfds name or `'folder:/path/to/root'`.
        split: split name (tfds slicing allowed).
    """
    if sources.is_folder(dataset):
        return sources.folder_source(dataset, split)
    builder = sources.get_builder(dataset, data_config.data_dir, data_config.download)
    sources.check_split(builder, split)
    return sources.load_in_memory(builder, split)


def get_dataset_info(
    dataset: str, data_dir: str | None = None, download: bool = False
) -> DatasetInfo:
    """Describes a dataset, preparing it first if that needs no download.

    Args:
        dataset: tfds name or `'folder:/path/to/root'`.
        data_dir: tfds data dir; None for tfds' default.
        download: allow downloading and preparing a missing tfds dataset.

    Raises:
        DatasetNotAvailableError: unknown name (close matches are listed), a
            tfds dataset that is not prepared while `download` is False (the
            message says how to prepare it, including where manually downloaded
            files go), or a folder that does not exist.
    """
    return sources.dataset_info(dataset, data_dir=data_dir, download=download)


__all__ = [
    'ArraySource',
    'DatasetInfo',
    'DatasetNotAvailableError',
    'create_eval_iterator',
    'create_train_iterator',
    'default_data_config',
    'get_dataset_info',
    'load_source',
    'per_class_indices',
]
