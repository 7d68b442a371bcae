"""Bad image files: the up-front check of an image folder, and logging each one once.

A file that cannot be decoded never stops a run. The iterators replace it by a
marked substitute (`'valid'` 0, see `pipeline.py`); `check_dataset` finds such files
before training, lists every one, and refuses the dataset only when more than
`config.data.max_bad_fraction` of it is bad, since that means the wrong folder or a
broken copy rather than a few damaged files.

The check reads each file's first and last bytes (a thread pool, so a slow or
network file system serves many files at once) and decodes only the files whose
ending looks wrong, with the pipeline's own decoder, so a file it passes decodes in
training too unless it is damaged in its middle, which the iterators still catch.
"""

import concurrent.futures
import dataclasses
import os
import struct
import threading

from absl import logging

from flaxnets_errors import ConfigError, UserError
from input_pipeline import preprocess, sources
from input_pipeline.config import DEFAULT_MAX_BAD_FRACTION

_HEAD_BYTES = 32
_TAIL_BYTES = 16
_PNG_END = b'IEND\xaeB`\x82'  # The IEND chunk's type and CRC end every PNG.
_SHOWN_IN_ERROR = 5

_logged: set[str] = set()
_logged_lock = threading.Lock()


class BadDataError(UserError, ValueError):
    """Too large a fraction of a dataset's image files cannot be decoded."""


def log_bad_example(what: str, reason: str) -> None:
    """Logs (absl warning) an undecodable example, once per process.

    Args:
        what: the file path, or '<dataset> <split> example <index>'.
        reason: why it cannot be decoded.
    """
    with _logged_lock:
        if what in _logged:
            return
        _logged.add(what)
    logging.warning('Undecodable image, skipped (replaced by a marked substitute): %s: %s',
                    what, reason)


def _sniff(head: bytes) -> str | None:
    if head.startswith(b'\xff\xd8\xff'):
        return 'JPEG'
    if head.startswith(b'\x89PNG\r\n\x1a\n'):
        return 'PNG'
    if head[:6] in (b'GIF87a', b'GIF89a'):
        return 'GIF'
    if head.startswith(b'BM'):
        return 'BMP'
    if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
        return 'WebP'
    return None


def _ends_well(kind: str, head: bytes, tail: bytes, size: int) -> bool:
    """Whether the file ends as a complete file of its format does."""
    if kind == 'JPEG':
        return tail.endswith(b'\xff\xd9')
    if kind == 'PNG':
        return head[12:16] == b'IHDR' and tail.endswith(_PNG_END)
    if kind == 'GIF':
        return tail.endswith(b';')
    if kind == 'BMP':
        return len(head) >= 6 and struct.unpack('<I', head[2:6])[0] in (0, size)
    return len(head) >= 8 and struct.unpack('<I', head[4:8])[0] + 8 <= size  # WebP


def check_file(path: str) -> str | None:
    """Why the image file at `path` cannot be used, or None when it looks sound."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 'empty file (0 bytes)'
        with open(path, 'rb') as f:
            head = f.read(_HEAD_BYTES)
            f.seek(max(size - _TAIL_BYTES, 0))
            tail = f.read()
    except OSError as e:
        return f'cannot be read ({e.strerror or e})'
    kind = _sniff(head)
    if kind is None:
        return f'not a JPEG, PNG, GIF, BMP or WebP image (it starts with {head[:8]!r})'
    if _ends_well(kind, head, tail, size):
        return None
    # A suspicious ending (truncated, or trailing bytes after a complete image): decode
    # it as the pipeline would and trust that verdict.
    try:
        with open(path, 'rb') as f:
            problem = preprocess.decode_problem(f.read())
    except OSError as e:
        return f'cannot be read ({e.strerror or e})'
    if problem is None:
        return None
    return f'truncated or damaged {kind} file ({size:,} bytes): {problem}'


@dataclasses.dataclass(frozen=True)
class DataCheckReport:
    """What `check_dataset` found.

    Attributes:
        dataset, split: what was checked.
        checked: False for tfds datasets, which tfds validated when preparing them.
        num_files: image files checked (0 when not checked).
        bad: (path, reason) of every file that cannot be decoded, in split order.
        max_bad_fraction: the limit it was checked against.
    """

    dataset: str
    split: str
    checked: bool
    num_files: int
    bad: tuple[tuple[str, str], ...]
    max_bad_fraction: float

    @property
    def fraction(self) -> float:
        return len(self.bad) / self.num_files if self.num_files else 0.0

    def lines(self) -> list[str]:
        """One line per bad file: 'path: reason'."""
        return [f'{path}: {reason}' for path, reason in self.bad]

    def summary(self) -> str:
        if not self.checked:
            return f'{self.dataset} {self.split}: not checked (tfds dataset).'
        return (
            f'{self.dataset} {self.split}: {len(self.bad):,} of {self.num_files:,} image files '
            f'cannot be decoded ({self.fraction:.3%}; limit {self.max_bad_fraction:.3%}).'
        )

    def __str__(self) -> str:
        return '\n'.join([self.summary(), *self.lines()])


def check_dataset(data_config, dataset: str, split: str, *, num_threads: int | None = None
                  ) -> DataCheckReport:
    """Checks every image file of a `folder:` split before training; no-op for tfds.

    Every bad file is logged (one absl warning per file) and listed in the report. The
    iterators substitute such files anyway; this check makes the list known up front and
    stops a run whose data is mostly broken.

    Args:
        data_config: `config.data`; its `max_bad_fraction` is the limit.
        dataset: `'folder:/root'` (checked) or a tfds name (returns an unchecked report).
        split: the split's folder name.
        num_threads: files checked at once; default 4 per CPU, at most 32.

    Returns:
        The report (also for a clean or an unchecked dataset).

    Raises:
        BadDataError (a `flaxnets_errors.UserError`): the bad fraction exceeds
            `max_bad_fraction`; the message names the count, the fraction, a few files
            and the fix.
        DatasetNotAvailableError: the folder or split does not exist.
    """
    limit = float(data_config.get('max_bad_fraction', DEFAULT_MAX_BAD_FRACTION))
    if not 0.0 <= limit <= 1.0:
        raise ConfigError(f'config.data.max_bad_fraction must be in [0, 1], got {limit}.')
    if not sources.is_folder(dataset):
        return DataCheckReport(dataset, split, False, 0, (), limit)
    paths = [str(p) for p in sources.folder_source(dataset, split).data]
    workers = num_threads or min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check_file, paths, chunksize=64))
    bad = tuple((p, r) for p, r in zip(paths, reasons, strict=True) if r is not None)
    report = DataCheckReport(dataset, split, True, len(paths), bad, limit)
    for path, reason in bad:
        log_bad_example(path, reason)
    if bad:
        logging.warning('%s', report.summary())
    if report.fraction > limit:
        shown = ', '.join(p for p, _ in bad[:_SHOWN_IN_ERROR])
        more = f' and {len(bad) - _SHOWN_IN_ERROR:,} more' if len(bad) > _SHOWN_IN_ERROR else ''
        raise BadDataError(
            f'{len(bad):,} of {len(paths):,} image files ({report.fraction:.3%}) in {dataset} '
            f'split {split!r} cannot be decoded, more than config.data.max_bad_fraction='
            f'{limit:g} allows: {shown}{more} (each file and its reason is logged). Remove or '
            f'replace those files, or raise config.data.max_bad_fraction to train without them '
            f'(each is then replaced by a substitute that the loss skips).'
        )
    return report
