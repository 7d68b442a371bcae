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

Decoding uses TensorFlow's own decoders for every source (image files, encoded
tfds images), so it runs in tf.data's C++ threads without the GIL. The train-time
random-resized crop of a JPEG decodes only its window (`decode_and_crop`), as
the Inception / TPU reference pipelines do.
"""

import math
import re

import numpy as np
import tensorflow as tf

from flaxnets_errors import ConfigError
from input_pipeline import augment

_METHODS = {
    'bilinear': tf.image.ResizeMethod.BILINEAR,
    'bicubic': tf.image.ResizeMethod.BICUBIC,
    'nearest': tf.image.ResizeMethod.NEAREST_NEIGHBOR,
    'area': tf.image.ResizeMethod.AREA,
}


_JPEG_EOI = b'\xff\xd9'
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _is_png(contents: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(contents, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)


def _ends_with_eoi(contents: tf.Tensor) -> tf.Tensor:
    """True when a JPEG's last two bytes are its End Of Image marker."""
    start = tf.maximum(tf.strings.length(contents) - 2, 0)
    return tf.equal(tf.strings.substr(contents, start, 2), _JPEG_EOI)


def decode_image(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF (first frame), BMP or WebP bytes to uint8 (H, W, channels).

    TensorFlow's decoders only, chosen by the leading bytes (never by file name). JPEG
    and PNG decode straight to `channels`; the others (whose decoders take 3 channels
    only) decode to RGB and are converted. Undecodable bytes raise InvalidArgumentError,
    which the pipeline turns into a marked substitute (see `pipeline.py`).
    """

    def jpeg():
        return tf.io.decode_jpeg(contents, channels=channels)

    def png():
        return tf.io.decode_png(contents, channels=channels)

    def other():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return convert_channels(image, channels)

    image = tf.case(
        [(tf.image.is_jpeg(contents), jpeg), (_is_png(contents), png)], default=other
    )
    image.set_shape([None, None, channels])
    return image


def decode_and_crop(contents: tf.Tensor, channels: int, window_fn) -> tf.Tensor:
    """Decodes only the window `window_fn` picks from the image's shape.

    For JPEG the shape comes from the header (`extract_jpeg_shape`) and only the window
    is decoded (`decode_and_crop_jpeg`: the rows below it are never decompressed, those
    above are only entropy-decoded), which is most of the train-time decode cost saved
    for a random-resized crop. A JPEG that does not end with its End Of Image marker
    (truncated, or with trailing bytes) is decoded whole, so a truncated file fails the
    same way whatever window it gets. Other formats are decoded whole and sliced. The
    pixels are those of decoding the whole image and slicing it, except that libjpeg
    upsamples subsampled chroma at the window's border from fewer neighbours (seen:
    differences of at most 2 levels in a few border pixels).

    Args:
        contents: encoded image bytes (scalar string).
        channels: 1 or 3.
        window_fn: fn(shape int32 (3,)) -> (begin, size), `tf.slice` arguments for an
            (H, W, C) image (begin[2] == 0, size[2] == -1).
    """

    def jpeg():
        begin, size = window_fn(tf.image.extract_jpeg_shape(contents))

        def window_only():
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            return tf.image.decode_and_crop_jpeg(contents, window, channels=channels)

        def whole():
            return tf.slice(tf.io.decode_jpeg(contents, channels=channels), begin, size)

        return tf.cond(_ends_with_eoi(contents), window_only, whole)

    def other():
        image = decode_image(contents, channels)
        begin, size = window_fn(tf.shape(image))
        return tf.slice(image, begin, size)

    image = tf.cond(tf.image.is_jpeg(contents), jpeg, other)
    image.set_shape([None, None, channels])
    return image


def encoded_bytes(x: tf.Tensor, kind: str) -> tf.Tensor:
    """The encoded image of an 'encoded' element (bytes) or a 'files' element (a path)."""
    if kind == 'files':
        return tf.io.read_file(x)
    if kind == 'encoded':
        return x
    raise ValueError(f'Source kind {kind!r} holds no encoded images.')


def decode(x: tf.Tensor, kind: str, channels: int) -> tf.Tensor:
    """Returns a uint8 (H, W, channels) image from a source element.

    Args:
        x: uint8 image ('array'), encoded bytes ('encoded') or a path ('files').
        kind: see `sources.ArraySource`.
        channels: wanted number of channels, 1 or 3.
    """
    if kind == 'array':
        return convert_channels(x, channels)
    if kind not in ('encoded', 'files'):
        raise ValueError(f'Unknown source kind {kind!r}.')
    return decode_image(encoded_bytes(x, kind), channels)


def decode_problem(contents: bytes, channels: int = 3) -> str | None:
    """Why `contents` cannot be decoded (the decoder's message), or None if it can.

    Runs the pipeline's decoder eagerly; used to explain a substituted example.
    """
    try:
        decode_image(tf.constant(contents), channels)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        # Drop TensorFlow's '{{function_node ...}}' prefix and '[Op:...]' suffix.
        message = re.sub(r'\{\{.*?\}\}|\[Op:.*', ' ', str(e.message))
        return ' '.join(message.split()) or type(e).__name__
    return None


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


def inception_window(shape, seed, scale, ratio):
    """The random-resized crop's window for an image of `shape` (H, W, C).

    Returns `tf.slice` (begin, size). Falls back to the whole image when no window
    fits in 10 attempts.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def inception_crop(image, seed, size: int, scale, ratio, method: str) -> tf.Tensor:
    """Random-resized crop (Szegedy et al. 2015; timm's RandomResizedCrop)."""
    begin, crop_size = inception_window(tf.shape(image), seed, scale, ratio)
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
    """Maps uint8-range values to (x / 255 - mean) / std; mean/std in [0, 1] units.

    Per-channel constants are expanded to the image's full (H, W, C) shape when that
    is static: TensorFlow's CPU kernels for a [C]-vector broadcast run about 4x slower
    than same-shape ones (measured: 0.86 vs 0.21 ms for a 224x224x3 image), which made
    normalisation the largest cost of ImageNet preprocessing. The values are the same.
    """
    mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
    image = tf.cast(image, tf.float32) / 255.0
    hwc = image.shape[-3:]
    if image.shape.rank in (3, 4) and hwc.is_fully_defined():
        mean = np.broadcast_to(mean, hwc).copy()
        std = np.broadcast_to(std, hwc).copy()
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
    (int64 (2,), the example's stateless seed); eval elements carry 'mask'. Other
    keys (source extras such as pseudo-label 'targets', the pipeline's bookkeeping)
    pass through. An undecodable image raises InvalidArgumentError.
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

    # The random-resized crop reads only its window of an encoded image (see
    # `decode_and_crop`); the other transforms need the whole decoded image.
    crop_while_decoding = (
        train
        and data_config.train_augment == 'inception_crop'
        and not source_size
        and kind in ('encoded', 'files')
    )

    def fn(element):
        if train:
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(element['seed'], num=2)
            )
        if crop_while_decoding:
            image = decode_and_crop(
                encoded_bytes(element['x'], kind),
                channels,
                lambda shape: inception_window(
                    shape, crop_seed, data_config.inception_scale, data_config.inception_ratio
                ),
            )
            image = tf.image.resize(image, [image_size, image_size], method=_METHODS[method])
        else:
            image = decode(element['x'], kind, channels)
        if source_size:
            # Before any crop, so train and eval see the same rescaled digits.
            image = tf.image.resize(image, [source_size, source_size], method=_METHODS[method])
            image.set_shape([source_size, source_size, channels])
        if train:
            if data_config.train_augment == 'inception_crop':
                if not crop_while_decoding:  # else cropped and resized above
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
