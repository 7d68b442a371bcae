"""Data for flaxnets: tfds datasets and image folders, preprocessed and batched.

Public API:
    default_data_config()      the `config.data` fields and their defaults.
    get_dataset_info(...)      classes, split sizes and image shape of a dataset.
    create_train_iterator(...) endless, exactly resumable training batches.
    create_eval_iterator(...)  one padded pass over a split, with 'mask'.
    check_dataset(...)         lists a `folder:` split's undecodable files up front.
    load_source(...)           a split for random access (subsets, pseudo-labels).
    DatasetInfo, DatasetNotAvailableError, DataCheckReport, BadDataError.

Every train batch carries 'valid' (float32, 0.0 for the substitute of an image that
could not be decoded) and every eval batch 'mask' and 'valid'; see `pipeline.py`.

Importing this package registers two offline tfds datasets, `mnist5k` and
`digits` (see `builders.py`), which prepare themselves on first use.

Datasets are named like tfds names (`'cifar10'`, `'imagenet2012'`,
`'mnist5k'`) or `'folder:/path/to/root'` for root/<split>/<class_name>/*.jpg|png
(classes sorted by name). See `pipeline.py` for the determinism guarantees and
`convert.py` for giving a TFRecord tfds dataset random access.
"""

from input_pipeline import builders as _builders  # noqa: F401  (registers the datasets)
from input_pipeline import sources
from input_pipeline.checks import BadDataError, DataCheckReport, check_dataset
from input_pipeline.config import default_data_config
from input_pipeline.pipeline import create_eval_iterator, create_train_iterator
from input_pipeline.sources import (
    ArraySource,
    DatasetInfo,
    DatasetNotAvailableError,
    RecordSource,
    per_class_indices,
)


def load_source(data_config, dataset: str, split: str) -> ArraySource | RecordSource:
    """A whole split for random access (subsets, pseudo-labels).

    Small tfds splits (see `config.data.in_memory`) are held in host memory; large ones
    stored as ArrayRecord are read by index from their files (`RecordSource`); image
    folders are lists of files.

    Args:
        data_config: `config.data` (its `data_dir`, `download` and `in_memory` are used).
        dataset: tfds name or `'folder:/path/to/root'`.
        split: split name (tfds slicing allowed).
    """
    if sources.is_folder(dataset):
        return sources.folder_source(dataset, split)
    builder = sources.get_builder(dataset, data_config.data_dir, data_config.download)
    sources.check_split(builder, split)
    if not sources.use_in_memory(data_config.in_memory, builder, split) and (
        sources.has_array_record(builder)
    ):
        return sources.RecordSource(builder, split)
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
    'BadDataError',
    'DataCheckReport',
    'DatasetInfo',
    'DatasetNotAvailableError',
    'RecordSource',
    'check_dataset',
    'create_eval_iterator',
    'create_train_iterator',
    'default_data_config',
    'get_dataset_info',
    'load_source',
    'per_class_indices',
]
