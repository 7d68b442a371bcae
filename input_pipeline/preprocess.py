"""Per-example decoding, augmentation and normalisation (TensorFlow ops).

Every random op is a `tf.random.experimental.stateless_*` / `tf.image.stateless_*`
op keyed by the example's own seed, which the pipeline derives from
(run seed, global stream position). An example's augmentation therefore does not
depend on which thread, process or resumed run produces it.

Two families, selected by `config.data.preprocess`:
    'imagenet' (timm / Inception semantics)
        train: random-resized crop of `inception_scale` area and
            `inception_ratio` aspect, resized to image_size; optional flip.
        eval: resize the shorter side to floor(image_size / crop_pct), centre
            crop image_size (224 <- 256 for crop_pct 0.875).
    'small' (MNIST, CIFAR, digits)
        train: zero-pad by `crop_padding`, random crop back to the source size,
            optional flip, then the eval resize.
        eval: `resize_small`: identity at the right size; symmetric zero padding
            when the target is larger by an even number of pixels (28 -> 32, as
            LeNet-5 pads MNIST); bilinear (or `interpolation`) resize otherwise.

In training, RandAugment or AutoAugment (`augment.py`) follows the crop and flip,
at the output size and before normalisation, keyed by its own seed folded from
the example's.
"""

import math

import numpy as np
import tensorflow as tf
from PIL import Image

from flaxnets_errors import ConfigError
from input_pipeline import augment

_METHODS = {
    'bilinear': tf.image.ResizeMethod.BILINEAR,
    'bicubic': tf.image.ResizeMethod.BICUBIC,
    'nearest': tf.image.ResizeMethod.NEAREST_NEIGHBOR,
    'area': tf.image.ResizeMethod.AREA,
}


def _decode_file_np(path: bytes, channels: np.ndarray) -> np.ndarray:
    """Decodes an image file with PIL; errors name the file."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    try:
        with Image.open(path) as img:
            img = img.convert('L' if int(channels) == 1 else 'RGB')
            array = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises several types; all mean "bad file".
        raise ValueError(f'Cannot decode image file {path}: {e}') from e
    return array.reshape(array.shape[0], array.shape[1], int(channels))


def decode(x: tf.Tensor, kind: str, channels: int) -> tf.Tensor:
    """Returns a uint8 (H, W, channels) image from a source element.

    Args:
        x: uint8 image ('array'), encoded bytes ('encoded') or a path ('files').
        kind: see `sources.ArraySource`.
        channels: wanted number of channels, 1 or 3.
    """
    if kind == 'array':
        return convert_channels(x, channels)
    if kind == 'encoded':
        # Decoders convert gray <-> RGB themselves when asked for `channels`.
        image = tf.io.decode_image(x, channels=channels, expand_animations=False)
    elif kind == 'files':
        # tf.io.decode_image would fail without naming the file; PIL in a
        # numpy_function lets the error say which file is broken.
        image = tf.numpy_function(_decode_file_np, [x, channels], tf.uint8, stateful=False)
    else:
        raise ValueError(f'Unknown source kind {kind!r}.')
    image.set_shape([None, None, channels])
    return image


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """1 -> 3 repeats the gray channel; 3 (or RGBA) -> 1 takes the luminance."""
    have = image.shape[-1]
    if have == 4:
        image, have = image[..., :3], 3  # Alpha carries no class information.
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return tf.tile(image, [1, 1, 3])
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f'Cannot convert images with {have} channels to {channels}.')


def inception_crop(image, seed, size: int, scale, ratio, method: str) -> tf.Tensor:
    """Random-resized crop (Szegedy et al. 2015; timm's RandomResizedCrop).

    Falls back to the whole image when no crop fits in 10 attempts.
    """
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, [size, size], method=_METHODS[method])


def pad_and_random_crop(image, seed, padding: int) -> tf.Tensor:
    """Zero-pads by `padding` pixels and crops back to the original size."""
    if padding <= 0:
        return image
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    crop = tf.image.stateless_random_crop(padded, shape, seed=seed)
    # Keep the static shape: `resize_small` decides pad vs resize from it.
    return tf.ensure_shape(crop, image.shape)


def resize_small(image, size: int, method: str) -> tf.Tensor:
    """Brings an image to size x size, zero-padding when that is exact.

    LeNet-5 (LeCun et al. 1998) feeds 28x28 MNIST digits centred in a 32x32
    field; padding keeps the strokes pixel-exact where resizing would blur them.
    The choice is made from the static shape, so images of varying size (folders,
    encoded tfds images) are always resized.
    """
    h, w = image.shape[0], image.shape[1]
    if h is not None and w is not None:
        if (h, w) == (size, size):
            return image
        dh, dw = size - h, size - w
        if dh >= 0 and dw >= 0 and dh % 2 == 0 and dw % 2 == 0:
            return tf.pad(image, [[dh // 2, dh // 2], [dw // 2, dw // 2], [0, 0]])
    return tf.image.resize(image, [size, size], method=_METHODS[method])


def resize_shorter_center_crop(image, size: int, crop_pct: float, method: str) -> tf.Tensor:
    """timm eval transform: shorter side to floor(size / crop_pct), centre crop."""
    scale_size = math.floor(size / crop_pct)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    short = tf.minimum(h, w)
    # torchvision: the longer side becomes int(scale_size * long / short).
    new_h = tf.cast(tf.floor(scale_size * h / short), tf.int32)
    new_w = tf.cast(tf.floor(scale_size * w / short), tf.int32)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method=_METHODS[method])
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    return image[top : top + size, left : left + size, :]


def normalize(image, mean, std, channels: int) -> tf.Tensor:
    """Maps uint8-range values to (x / 255 - mean) / std; mean/std in [0, 1] units."""
    mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
    image = tf.cast(image, tf.float32) / 255.0
    return (image - mean) / std


def make_preprocess_fn(
    data_config,
    *,
    train: bool,
    kind: str,
    image_size: int,
    channels: int,
    mean,
    std,
    normalize_images: bool = True,
):
    """Returns fn(element) -> {'image', 'label'[, 'mask']} for tf.data.map.

    `element` has 'x' (see `decode`), 'label' and, in training, 'seed'
    (int64 (2,), the example's stateless seed); eval elements carry 'mask'.
    With `normalize_images` False the image is float32 in [0, 255] pixel units,
    for batch-level mixing that normalises afterwards.
    """
    if data_config.preprocess not in ('imagenet', 'small'):
        raise ConfigError(f'Unknown preprocess {data_config.preprocess!r}.')
    if data_config.train_augment not in ('inception_crop', 'random_crop', 'crop', 'none'):
        raise ConfigError(f'Unknown train_augment {data_config.train_augment!r}.')
    if data_config.interpolation not in _METHODS:
        raise ConfigError(f'interpolation must be one of {sorted(_METHODS)}.')
    if channels not in (1, 3):
        raise ConfigError(f'channels must be 1 or 3, got {channels}.')
    method = data_config.interpolation
    augment_fn = augment.example_augmenter(data_config) if train else None

    def eval_transform(image):
        if data_config.preprocess == 'imagenet':
            return resize_shorter_center_crop(image, image_size, data_config.crop_pct, method)
        return resize_small(image, image_size, method)

    source_size = int(data_config.get('source_size', 0) or 0)

    def fn(element):
        image = decode(element['x'], kind, channels)
        if source_size:
            # Before any crop, so train and eval see the same rescaled digits.
            image = tf.image.resize(image, [source_size, source_size], method=_METHODS[method])
            image.set_shape([source_size, source_size, channels])
        if train:
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(element['seed'], num=2)
            )
            if data_config.train_augment == 'inception_crop':
                image = inception_crop(
                    image,
                    crop_seed,
                    image_size,
                    data_config.inception_scale,
                    data_config.inception_ratio,
                    method,
                )
            elif data_config.train_augment == 'crop':
                # BiT's fine-tuning crop: a random image_size square of the (source_size)
                # image, no padding and no rescaling.
                image = tf.image.stateless_random_crop(
                    image, [image_size, image_size, channels], seed=crop_seed
                )
            else:
                if data_config.train_augment == 'random_crop':
                    image = pad_and_random_crop(image, crop_seed, data_config.crop_padding)
                image = eval_transform(image)
            if data_config.flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            if augment_fn is not None:
                image = tf.ensure_shape(image, [image_size, image_size, channels])
                image = augment_fn(image, augment.example_seed(element['seed']))
        else:
            image = eval_transform(image)
        image = tf.ensure_shape(image, [image_size, image_size, channels])
        out = {
            'image': (
                normalize(image, mean, std, channels)
                if normalize_images
                else tf.cast(image, tf.float32)
            ),
            'label': tf.cast(element['label'], tf.int32),
        }
        for key, value in element.items():
            # Per-example extras of the source (e.g. pseudo-label 'targets') pass through.
            if key not in ('x', 'label', 'seed', 'mask'):
                out[key] = value
        if 'mask' in element:
            # Padding rows repeat a real example; zero them so they are inert.
            out['image'] *= element['mask']
            out['label'] *= tf.cast(element['mask'], tf.int32)
            out['mask'] = element['mask']
        return out

    return fn
