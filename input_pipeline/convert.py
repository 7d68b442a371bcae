"""Adds ArrayRecord files to a tfds dataset prepared as TFRecord, for random access.

    python -m input_pipeline.convert imagenet2012 --data_dir ~/tensorflow_datasets

TFRecord files can only be read in sequence, so a large split stored that way is
streamed and its training order depends on the process count (see `pipeline.py`).
ArrayRecord files are read by index, which gives every dataset the random-access
order. `tfds build NAME --file_format=array_record` prepares a dataset that way from
its sources (for ImageNet: the manual tars, hours of work); `tfds convert_format` needs
Apache Beam. This module copies the records of each TFRecord shard, in order, into an
ArrayRecord shard next to it (same name pattern, same record counts) and registers
`array_record` as an alternative file format in `dataset_info.json`. tfds then keeps
reading TFRecord for `as_dataset` and reads ArrayRecord for `as_data_source`, which
the pipeline uses. The records are the same serialized examples, so nothing is
decoded. Shards are written to a temporary name and renamed when complete; an
interrupted conversion is resumed by running the command again.
"""

import argparse
import concurrent.futures
import os
import sys

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module

from input_pipeline import sources

_FORMAT = tfds.core.FileFormat.ARRAY_RECORD


def _convert_shard(src: str, dst: str, expected: int) -> int:
    if os.path.exists(dst):
        reader = array_record_module.ArrayRecordReader(dst)
        try:
            if reader.num_records() == expected:
                return expected  # Converted by an earlier, interrupted run.
        finally:
            reader.close()
    tmp = f'{dst}.incomplete'
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    count = 0
    try:
        for record in tf.data.TFRecordDataset(src).as_numpy_iterator():
            writer.write(record)
            count += 1
    finally:
        writer.close()
    if count != expected:
        os.remove(tmp)
        raise RuntimeError(f'{src} holds {count} records; dataset_info.json says {expected}.')
    os.replace(tmp, dst)
    return count


def convert_to_array_record(
    dataset: str, data_dir: str | None = None, *, num_threads: int = 4
) -> list[str]:
    """Writes ArrayRecord copies of a prepared tfds dataset's TFRecord shards.

    Args:
        dataset: tfds name, optionally with config and version.
        data_dir: tfds data dir; None for tfds' default.
        num_threads: shards converted at once.

    Returns:
        The ArrayRecord files written (empty when the dataset already has them).

    Raises:
        DatasetNotAvailableError: the dataset is not prepared in `data_dir`.
    """
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
        raise sources.DatasetNotAvailableError(
            f'{dataset} is not prepared in {os.fspath(builder.data_dir_root)}; prepare it first '
            f'(tfds build {builder.name} --data_dir {os.fspath(builder.data_dir_root)}).'
        )
    info = builder.info
    if sources.has_array_record(builder):
        logging.info('%s already has ArrayRecord files in %s.', dataset, builder.data_dir)
        return []
    jobs = []
    for split_info in info.splits.values():
        template = split_info.filename_template.replace(filetype_suffix=_FORMAT.file_suffix)
        targets = sorted(template.sharded_filepaths(split_info.num_shards))
        for src, dst, n in zip(
            split_info.filepaths, targets, split_info.shard_lengths, strict=True
        ):
            jobs.append((os.fspath(src), os.fspath(dst), int(n)))
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        counts = list(pool.map(lambda job: _convert_shard(*job), jobs))
    info.add_alternative_file_format(_FORMAT)
    info.write_to_directory(builder.data_dir)
    logging.info(
        'Wrote %d ArrayRecord shards (%d records) for %s in %s.',
        len(jobs), sum(counts), dataset, builder.data_dir,
    )
    return [dst for _, dst, _ in jobs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description='Add ArrayRecord files (random access) to a tfds dataset prepared as TFRecord.'
    )
    parser.add_argument('dataset', help="tfds name, e.g. 'imagenet2012'")
    parser.add_argument('--data_dir', default=None, help="tfds data dir (default: tfds' own)")
    parser.add_argument('--threads', type=int, default=4, help='shards converted at once')
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        written = convert_to_array_record(args.dataset, args.data_dir, num_threads=args.threads)
    except sources.DatasetNotAvailableError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'{len(written)} ArrayRecord files written.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
