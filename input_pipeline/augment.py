"""RandAugment, AutoAugment (per example) and mixup / CutMix (per batch), in TF.

All randomness is stateless: every function takes an int64 (2,) seed tensor and
is a pure function of its inputs. The pipeline derives the per-example seed from
(run seed, global stream position) and the per-batch seed from (run seed, step),
so augmented batches keep the determinism contract described in `pipeline.py`.

Images are HWC with C = 1 or 3, uint8 or float32 in uint8 units [0, 255]; the
ops compute in float32 and return the input dtype (uint8 rounded, float clipped
to [0, 255]). Geometric ops fill uncovered pixels with 0 (black), PIL's default
that the AutoAugment reference used, and the background of digit datasets.

Magnitude scale (RandAugment, Cubuk et al. 2020, and the TF EfficientNet
implementation of it): an op's strength is `level / 10` of the maximum of the
AutoAugment search range (Cubuk et al. 2019, Table 1 / Appendix), so M = 10 is
the paper's maximum, M = 9 its ImageNet ResNet-50 setting; M up to 30
extrapolates linearly (EfficientNet-B7 / Noisy Student use M = 27-28), with each
op's argument clamped to its valid domain. The maxima:

    Rotate              30 degrees
    ShearX / ShearY     0.3 (shear factor, about the image centre)
    TranslateX / Y      0.45 of the width / height (150 px of 331 in the paper)
    Cutout              0.18 of the shorter side (60 px of 331)
    Solarize            threshold range [0, 256]
    Posterize           bits range [4, 8]
    Color / Contrast / Brightness / Sharpness   enhancement factor [0.1, 1.9]

RandAugment uses the "strength increases with magnitude" reading of these ranges
(timm's `*Increasing` ops), so M = 0 is the identity for every op and one M sets
the strength of all of them: enhancement factor 1 +- 0.9 * level / 10 (random
sign), Solarize threshold 256 - 25.6 * level, Posterize keeps
8 - int(0.4 * level) bits. AutoAugment keeps the mapping its policy was searched
with (the TF reference): factor 0.1 + 0.18 * level, threshold 25.6 * level,
bits 4 + int(0.4 * level). Rotate, Shear and Translate take a random sign in both.

Shears are about the image centre; the references shear about the top-left
corner, which also shifts the image by up to 0.3 * H, a shift the translate ops
already provide.
"""

import math
from collections.abc import Callable

import tensorflow as tf

from flaxnets_errors import ConfigError

FILL_VALUE = 0.0
MAX_LEVEL = 10.0  # The level at which an op reaches its range maximum.
MAX_MAGNITUDE = 30.0

# Salts that separate the streams derived from the pipeline's seeds: per-example
# augmentation draws from fold_in((seed, position), EXAMPLE_SALT), mixing from
# fold_in((seed, step), BATCH_SALT), neither of which the crop/flip seeds
# (stateless_split of (seed, position)) can coincide with.
EXAMPLE_SALT = 0x5A_A0
BATCH_SALT = 0x3D_1C

_DEFAULT_MAXIMA = {
    'Rotate': 30.0,
    'ShearX': 0.3,
    'ShearY': 0.3,
    'TranslateX': 150.0 / 331.0,
    'TranslateY': 150.0 / 331.0,
    'Cutout': 60.0 / 331.0,
}

# RandAugment paper, Section 4 / Figure 2: the 14 ImageNet transformations.
IMAGENET_OPS = (
    'Identity',
    'AutoContrast',
    'Equalize',
    'Rotate',
    'Solarize',
    'Color',
    'Posterize',
    'Contrast',
    'Brightness',
    'Sharpness',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
)

# Digit-safe: no op that changes what a glyph is or relies on colour (no flips,
# Invert, Equalize, Solarize, Posterize, Color), and geometric maxima halved or
# more so a 20 px digit in a 28-32 px field stays in frame and upright enough
# that 6 and 9 stay apart.
DIGITS_OPS = (
    'Identity',
    'AutoContrast',
    'Rotate',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Contrast',
    'Brightness',
    'Sharpness',
    'Cutout',
)
_DIGITS_MAXIMA = {
    'Rotate': 15.0,
    'ShearX': 0.15,
    'ShearY': 0.15,
    'TranslateX': 0.15,
    'TranslateY': 0.15,
    'Cutout': 0.25,
}

RANDAUGMENT_PRESETS = {
    'imagenet': (IMAGENET_OPS, {}),
    'digits': (DIGITS_OPS, _DIGITS_MAXIMA),
}

# AutoAugment (Cubuk et al. 2019), Appendix A, Table 9: the ImageNet policy, 25
# sub-policies of two (op, probability, magnitude in 0..9) steps. Magnitudes of
# ops without an argument are kept as printed; they are unused.
IMAGENET_POLICY = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, 4), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, 7)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, 2)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, 8), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, 2)),
    (('Equalize', 0.0, 7), ('Equalize', 0.8, 8)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, 8)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, 9)),
    (('Color', 0.4, 0), ('Equalize', 0.6, 3)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
)
AUTOAUGMENT_POLICIES = {'imagenet': IMAGENET_POLICY}


# ----------------------------------------------------------------------------
# Pixel ops: fn(image float32 HWC in [0, 255], arg float32 scalar, seed) -> image.


def _blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image):
    if image.shape[-1] == 1:
        return image
    return tf.image.rgb_to_grayscale(image)  # ITU-R 601-2 luma, as PIL's 'L'.


def _quantize(image):
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def identity(image, arg, seed):
    del arg, seed
    return image


def auto_contrast(image, arg, seed):
    """Stretches each channel so its darkest pixel is 0 and its brightest 255."""
    del arg, seed
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    span = hi - lo
    stretched = (image - lo) * (255.0 / tf.maximum(span, 1e-6))
    return tf.where(span > 0, stretched, image)


def _equalize_channel(channel):
    values = tf.cast(_quantize(channel), tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    # PIL's step: spread all but the last non-empty bin over 255 levels.
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
    step = (tf.reduce_sum(hist) - last) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(hist, exclusive=True) + safe_step // 2) // safe_step
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.float32)
    return tf.where(step > 0, tf.gather(lut, values), channel)


def equalize(image, arg, seed):
    """Per-channel histogram equalisation (PIL ImageOps.equalize)."""
    del arg, seed
    channels = [_equalize_channel(c) for c in tf.unstack(image, axis=-1)]
    return tf.stack(channels, axis=-1)


def invert(image, arg, seed):
    del arg, seed
    return 255.0 - image


def solarize(image, arg, seed):
    """Inverts pixels at or above the threshold `arg` (256 leaves all alone)."""
    del seed
    return tf.where(image < arg, image, 255.0 - image)


def posterize(image, arg, seed):
    """Keeps the `arg` (1..8) most significant bits of each value."""
    del seed
    quantum = tf.pow(2.0, 8.0 - arg)
    return tf.floor(_quantize(image) / quantum) * quantum


def color(image, arg, seed):
    """Saturation: blends with the grayscale image (identity for C = 1)."""
    del seed
    return _blend(_grayscale(image) * tf.ones_like(image), image, arg)


def contrast(image, arg, seed):
    """Blends with a flat image at the rounded mean luma."""
    del seed
    mean = tf.floor(tf.reduce_mean(_quantize(_grayscale(image))) + 0.5)
    return _blend(mean, image, arg)


def brightness(image, arg, seed):
    del seed
    return _blend(0.0, image, arg)


def sharpness(image, arg, seed):
    """Blends with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13).

    As in PIL, the one-pixel border of the smoothed image is the original, so
    the border never changes.
    """
    del seed
    c = image.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
    smooth = tf.pad(_quantize(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior > 0, smooth, image)
    return _blend(degenerate, image, arg)


def _affine(image, a0, a1, a2, b0, b1, b2, interpolation='BILINEAR'):
    """Samples output (x, y) from input (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])
    transform = tf.cast(tf.reshape(transform, [1, 8]), tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=FILL_VALUE,
        interpolation=interpolation,
        fill_mode='CONSTANT',
    )
    return out[0]


def _centre(image):
    shape = tf.cast(tf.shape(image), tf.float32)
    return (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0


def rotate(image, arg, seed):
    """Rotates by `arg` degrees about the centre."""
    del seed
    theta = arg * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = _centre(image)
    return _affine(image, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def shear_x(image, arg, seed):
    del seed
    _, cy = _centre(image)
    return _affine(image, 1.0, arg, -arg * cy, 0.0, 1.0, 0.0)


def shear_y(image, arg, seed):
    del seed
    cx, _ = _centre(image)
    return _affine(image, 1.0, 0.0, 0.0, arg, 1.0, -arg * cx)


def translate_x(image, arg, seed):
    """Shifts right by `arg` times the width, rounded to whole pixels."""
    del seed
    pixels = tf.round(arg * tf.cast(tf.shape(image)[1], tf.float32))
    return _affine(image, 1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 'NEAREST')


def translate_y(image, arg, seed):
    """Shifts down by `arg` times the height, rounded to whole pixels."""
    del seed
    pixels = tf.round(arg * tf.cast(tf.shape(image)[0], tf.float32))
    return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 'NEAREST')


def cutout(image, arg, seed):
    """Fills a square of side `arg` times the shorter side (DeVries & Taylor 2017).

    The centre is uniform over the image; the square is clipped at the borders.
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.cast(tf.round(arg * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
    centre = tf.random.stateless_uniform([2], seed, 0, 2**30, dtype=tf.int32) % tf.stack([h, w])
    top, left = centre[0] - side // 2, centre[1] - side // 2
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return tf.where(inside, FILL_VALUE, image)


OPS: dict[str, Callable] = {
    'Identity': identity,
    'AutoContrast': auto_contrast,
    'Equalize': equalize,
    'Invert': invert,
    'Rotate': rotate,
    'Solarize': solarize,
    'Color': color,
    'Posterize': posterize,
    'Contrast': contrast,
    'Brightness': brightness,
    'Sharpness': sharpness,
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateX': translate_x,
    'TranslateY': translate_y,
    'Cutout': cutout,
}
_SIGNED = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'})
_ENHANCE = frozenset({'Color', 'Contrast', 'Brightness', 'Sharpness'})


def op_argument(name, level, sign, *, maxima=None, convention='randaugment'):
    """Maps a level (0..30, 10 = range maximum) to the argument of op `name`.

    Args:
        name: a key of `OPS`.
        level: float32 scalar magnitude.
        sign: +1.0 or -1.0; used by the geometric and (RandAugment) enhancement
            ops.
        maxima: overrides of the geometric maxima (see `_DEFAULT_MAXIMA`).
        convention: 'randaugment' (strength grows from the identity at 0) or
            'autoaugment' (the mapping the AutoAugment policy was searched with).
    """
    level = tf.cast(level, tf.float32)
    frac = level / MAX_LEVEL
    autoaugment = convention == 'autoaugment'
    if name in _SIGNED or name == 'Cutout':
        maximum = {**_DEFAULT_MAXIMA, **(maxima or {})}[name]
        arg = frac * maximum
        if name == 'Rotate':
            return sign * arg
        if name == 'Cutout':
            return tf.minimum(arg, 1.0)
        return sign * tf.minimum(arg, 1.0)  # A shear or shift of 1 empties the image.
    if name in _ENHANCE:
        if autoaugment:
            return frac * 1.8 + 0.1
        return tf.maximum(1.0 + sign * frac * 0.9, 0.0)
    if name == 'Solarize':
        threshold = frac * 256.0 if autoaugment else 256.0 - frac * 256.0
        return tf.clip_by_value(threshold, 0.0, 256.0)
    if name == 'Posterize':
        step = tf.floor(frac * 4.0)
        bits = 4.0 + step if autoaugment else 8.0 - step
        return tf.clip_by_value(bits, 1.0, 8.0)
    return tf.constant(0.0)


def _graph_only(fn):
    # Plain TF ops with Python-level loops only: skipping AutoGraph's source
    # conversion inside tf.data.map saves seconds of set-up per pipeline.
    return tf.autograph.experimental.do_not_convert(fn)


def _apply_op(name, image, level, sign, seed, maxima, convention):
    arg = op_argument(name, level, sign, maxima=maxima, convention=convention)
    return tf.ensure_shape(OPS[name](image, arg, seed), image.shape)


def _random_sign(seed):
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)


def _to_float(image):
    return tf.cast(image, tf.float32)


def _from_float(image, dtype):
    image = tf.clip_by_value(image, 0.0, 255.0)
    if dtype == tf.uint8:
        return tf.cast(tf.round(image), tf.uint8)
    return tf.cast(image, dtype)


def resolve_ops(spec: str) -> tuple[tuple[str, ...], dict[str, float]]:
    """Returns (op names, geometric maxima) for a preset name or 'Op1,Op2,...'.

    A preset brings its own maxima ('digits' has smaller geometric ones); an
    explicit list uses the paper's.

    Raises:
        ValueError: unknown preset or op name, or an empty list.
    """
    if spec in RANDAUGMENT_PRESETS:
        ops, maxima = RANDAUGMENT_PRESETS[spec]
        return ops, dict(maxima)
    names = tuple(n.strip() for n in spec.split(',') if n.strip())
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        raise ConfigError(
            f'randaugment_ops {spec!r}: expected a preset ({", ".join(RANDAUGMENT_PRESETS)}) '
            f'or a comma-separated list of {", ".join(OPS)}; unknown: {unknown or "empty"}.'
        )
    return names, {}


@_graph_only
def randaugment(
    image,
    seed,
    *,
    num_layers: int,
    magnitude: float,
    ops='imagenet',
    magnitude_std: float = 0.0,
):
    """RandAugment (Cubuk et al. 2020): `num_layers` ops drawn uniformly, each applied.

    Args:
        image: uint8 or float32 (H, W, C) in [0, 255], C static (1 or 3).
        seed: int64 (2,) stateless seed of this example.
        num_layers: N, ops applied in sequence (with replacement).
        magnitude: M on the 0..30 scale of the module docstring (10 = maximum
            of the paper's ranges).
        ops: preset name or comma-separated op names (see `resolve_ops`).
        magnitude_std: per-op Gaussian noise on M as in timm's `mstd`; inf draws
            M' uniformly from [0, M]. M' is clipped to [0, 30].

    Returns:
        The augmented image, same shape and dtype.
    """
    names, maxima = resolve_ops(ops) if isinstance(ops, str) else (tuple(ops), {})
    dtype = image.dtype
    image = _to_float(image)

    def layer(x, layer_seed):
        op_seed, sign_seed, level_seed, arg_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seed, 4)
        )
        index = tf.random.stateless_uniform([], op_seed, 0, len(names), dtype=tf.int32)
        level = tf.constant(float(magnitude))
        if math.isinf(magnitude_std):
            level = tf.random.stateless_uniform([], level_seed, 0.0, float(magnitude))
        elif magnitude_std > 0:
            level = level + magnitude_std * tf.random.stateless_normal([], level_seed)
        level = tf.clip_by_value(level, 0.0, MAX_MAGNITUDE)
        sign = _random_sign(sign_seed)
        branches = [
            lambda name=name: _apply_op(name, x, level, sign, arg_seed, maxima, 'randaugment')
            for name in names
        ]
        return tf.switch_case(index, branches)

    # A loop over the layers builds the op graph once, whatever N is.
    layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)
    return _from_float(tf.foldl(layer, layer_seeds, initializer=image), dtype)


@_graph_only
def autoaugment(image, seed, *, policy='imagenet'):
    """AutoAugment (Cubuk et al. 2019): one sub-policy drawn uniformly per image.

    Each of its two steps is applied with its probability, at its magnitude
    (0..9 on the same level / 10 scale, the 'autoaugment' convention of
    `op_argument`).

    Args:
        image: uint8 or float32 (H, W, C) in [0, 255].
        seed: int64 (2,) stateless seed of this example.
        policy: a key of `AUTOAUGMENT_POLICIES`, or a policy table.
    """
    table = AUTOAUGMENT_POLICIES[policy] if isinstance(policy, str) else policy
    # Both steps look their op, probability and level up by the drawn
    # sub-policy inside one loop, so each distinct op is built once rather than
    # once per table entry (50 copies).
    names = sorted({name for sub_policy in table for name, _, _ in sub_policy} | {'Identity'})
    dtype = image.dtype
    image = _to_float(image)
    choose_seed, *step_seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    index = tf.random.stateless_uniform([], choose_seed, 0, len(table), dtype=tf.int32)
    # (step, sub-policy) tables of op index, probability and level.
    op_table = [[names.index(sub[k][0]) for sub in table] for k in range(2)]
    prob_table = [[float(sub[k][1]) for sub in table] for k in range(2)]
    level_table = [[float(sub[k][2]) for sub in table] for k in range(2)]

    def step(x, elems):
        k, step_seed = elems
        p_seed, sign_seed, arg_seed = tf.unstack(
            tf.random.experimental.stateless_split(step_seed, 3)
        )
        op_index = tf.gather(tf.gather(op_table, k), index)
        prob = tf.gather(tf.gather(prob_table, k), index)
        level = tf.gather(tf.gather(level_table, k), index)
        skip = tf.random.stateless_uniform([], p_seed) >= prob
        op_index = tf.where(skip, names.index('Identity'), op_index)
        sign = _random_sign(sign_seed)
        branches = [
            lambda name=name: _apply_op(name, x, level, sign, arg_seed, None, 'autoaugment')
            for name in names
        ]
        return tf.switch_case(op_index, branches)

    image = tf.foldl(step, (tf.range(2), tf.stack(step_seeds)), initializer=image)
    return _from_float(image, dtype)


def example_augmenter(data_config) -> Callable | None:
    """Returns fn(image, seed) for the configured per-example policy, or None.

    Raises:
        ValueError: both RandAugment and AutoAugment on, or bad settings.
    """
    layers = int(data_config.get('randaugment_layers', 0))
    policy = data_config.get('autoaugment', '') or ''
    if layers < 0:
        raise ConfigError(f'randaugment_layers must be >= 0, got {layers}.')
    if layers and policy:
        raise ConfigError('Set either randaugment_layers or autoaugment, not both.')
    if policy:
        if policy not in AUTOAUGMENT_POLICIES:
            raise ConfigError(
                f'autoaugment {policy!r}: expected "" or one of {sorted(AUTOAUGMENT_POLICIES)}.'
            )
        return lambda image, seed: autoaugment(image, seed, policy=policy)
    if not layers:
        return None
    magnitude = float(data_config.randaugment_magnitude)
    if not 0.0 <= magnitude <= MAX_MAGNITUDE:
        raise ConfigError(f'randaugment_magnitude must be in [0, 30], got {magnitude}.')
    ops = data_config.randaugment_ops
    resolve_ops(ops)  # Fail at construction, not inside tf.data.
    std = float(data_config.get('randaugment_magnitude_std', 0.0))
    return lambda image, seed: randaugment(
        image, seed, num_layers=layers, magnitude=magnitude, ops=ops, magnitude_std=std
    )


def example_seed(seed):
    """The augmentation seed of an example from its pipeline seed (seed, position)."""
    return tf.random.experimental.stateless_fold_in(seed, EXAMPLE_SALT)


# ----------------------------------------------------------------------------
# mixup / CutMix.


def batch_seed(seed: int, step) -> tf.Tensor:
    """The mixing seed of global batch `step` of a run with data seed `seed`."""
    pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(pair, BATCH_SALT)


def _beta(seed, alpha: float):
    """Beta(alpha, alpha) as G1 / (G1 + G2) with G ~ Gamma(alpha); float64 so
    that small alphas do not underflow both draws to 0."""
    g = tf.random.stateless_gamma([2], seed, alpha=alpha, dtype=tf.float64)
    total = g[0] + g[1]
    return tf.cast(tf.where(total > 0, g[0] / tf.maximum(total, 1e-300), 0.5), tf.float32)


@_graph_only
def mix_batch(
    images,
    labels,
    partner_images,
    partner_labels,
    seed,
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
):
    """mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with partners.

    As timm's `Mixup(mode='batch')`: with probability `prob` the batch is
    mixed; CutMix is chosen with probability `switch_prob` when both alphas are
    positive, else whichever is positive. One lam ~ Beta(alpha, alpha) for the
    batch. mixup: lam * x + (1 - lam) * x'. CutMix: a box of area about
    (1 - lam) * H * W (side ratio sqrt(1 - lam), centre uniform, clipped at the
    borders) is pasted from x', and lam is recomputed from the clipped box.

    Args:
        images: float32 (B, H, W, C).
        labels: int (B,).
        partner_images, partner_labels: what row i is mixed with.
        seed: int64 (2,) seed of this batch (`batch_seed`).
        num_classes: width of the targets.
        mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that method.
        prob: probability that the batch is mixed at all.
        switch_prob: probability of CutMix when both are enabled.

    Returns:
        (images, targets): targets float32 (B, num_classes) =
        lam * onehot(labels) + (1 - lam) * onehot(partner_labels); each row sums
        to 1.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0.')
    apply_seed, switch_seed, mixup_seed, cutmix_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5)
    )
    apply = tf.random.stateless_uniform([], apply_seed) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], switch_seed) < switch_prob
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    mixup_lam = _beta(mixup_seed, mixup_alpha) if mixup_alpha > 0 else tf.constant(1.0)
    cutmix_lam = _beta(cutmix_seed, cutmix_alpha) if cutmix_alpha > 0 else tf.constant(1.0)

    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    cut = tf.sqrt(1.0 - cutmix_lam)
    cut_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
    cut_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
    centre = tf.random.stateless_uniform([2], box_seed, 0, 2**30, dtype=tf.int32) % tf.stack([h, w])
    top = tf.clip_by_value(centre[0] - cut_h // 2, 0, h)
    bottom = tf.clip_by_value(centre[0] + cut_h // 2, 0, h)
    left = tf.clip_by_value(centre[1] - cut_w // 2, 0, w)
    right = tf.clip_by_value(centre[1] + cut_w // 2, 0, w)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    box_area = tf.cast((bottom - top) * (right - left), tf.float32)
    box_lam = 1.0 - box_area / tf.cast(h * w, tf.float32)

    lam = tf.where(apply, tf.where(use_cutmix, box_lam, mixup_lam), 1.0)
    # Per-pixel weight of the row's own image: lam for mixup, 0 / 1 for CutMix.
    weight = tf.where(use_cutmix, tf.where(in_box, 0.0, 1.0), mixup_lam)
    weight = tf.where(apply, weight, 1.0)
    mixed = weight * images + (1.0 - weight) * partner_images
    own = tf.one_hot(labels, num_classes, dtype=tf.float32)
    other = tf.one_hot(partner_labels, num_classes, dtype=tf.float32)
    return mixed, lam * own + (1.0 - lam) * other


def mixing_enabled(data_config) -> bool:
    return data_config.get('mixup_alpha', 0.0) > 0 or data_config.get('cutmix_alpha', 0.0) > 0


def batch_mixer(data_config, num_classes: int) -> Callable | None:
    """Returns fn(images, labels, partner_images, partner_labels, seed) or None.

    Raises:
        ValueError: negative alphas or probabilities outside [0, 1].
    """
    mixup_alpha = float(data_config.get('mixup_alpha', 0.0))
    cutmix_alpha = float(data_config.get('cutmix_alpha', 0.0))
    prob = float(data_config.get('mix_prob', 1.0))
    switch_prob = float(data_config.get('mix_switch_prob', 0.5))
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError('mixup_alpha and cutmix_alpha must be >= 0.')
    if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0):
        raise ConfigError('mix_prob and mix_switch_prob must be in [0, 1].')
    if not mixing_enabled(data_config):
        return None
    return lambda images, labels, partner_images, partner_labels, seed: mix_batch(
        images,
        labels,
        partner_images,
        partner_labels,
        seed,
        num_classes=num_classes,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
    )


__all__ = [
    'AUTOAUGMENT_POLICIES',
    'IMAGENET_POLICY',
    'OPS',
    'RANDAUGMENT_PRESETS',
    'autoaugment',
    'batch_mixer',
    'batch_seed',
    'example_augmenter',
    'example_seed',
    'mix_batch',
    'op_argument',
    'randaugment',
    'resolve_ops',
]
