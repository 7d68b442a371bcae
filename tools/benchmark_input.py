"""Input-pipeline throughput: images/s and images per CPU-second, ours and torchvision's.

    python tools/benchmark_input.py --dataset folder:/data/imagenet --workers 1,2,4
    python tools/benchmark_input.py --dataset imagenet2012 --data_dir ~/tensorflow_datasets \
        --train-split train --eval-split validation --workers 8
    python tools/benchmark_input.py --make-jpeg-tree /tmp/jpegs --num-images 2000
    python tools/benchmark_input.py --dataset folder:/tmp/jpegs --workers 1,2

Times `input_pipeline`'s train batches (ImageNet recipe: random-resized crop, flip,
normalisation) and eval batches (resize the shorter side, centre crop) of any dataset,
`folder:` or tfds, at 1..N workers (`config.data.num_parallel_calls`, the parallel
map's threads). For a `folder:` dataset the same is timed, interleaved in the same
process, for torchvision: `ImageFolder` + `RandomResizedCrop` + `RandomHorizontalFlip`
(train) or `Resize` + `CenterCrop` (eval), `ToTensor` and `Normalize`, through a
`DataLoader` with N worker processes (`--no-torchvision` skips it). `--grain` also
times Grain (https://github.com/google/grain) over the same random-access source (a
`folder:` tree's files, or a tfds split's ArrayRecord records): the same recipe in PIL and
NumPy per example, batches made in N worker processes (`mp_prefetch`). It is the library
the input issue named; we read the source by index with tf.data instead because its
native JPEG ops decode only the crop window, and this comparison measures that choice.

Each measurement builds a fresh iterator, takes `--warmup` batches, then times
`--batches` batches: images/s is wall time, images per CPU-second divides by the CPU
time of this process and its children (the DataLoader's workers) over the timed batches
only. Configurations are run interleaved (A, B, C, A, B, C, ...) `--repeats` times and
the medians are reported, so a change in the machine's load hits all alike; the ratios
between pipelines measured in one run are what to compare across machines.

`--make-jpeg-tree DIR` writes a `folder:` dataset of ImageNet-sized JPEGs (longer side
333-500 px, quality 90, some grayscale) cut from the photos bundled with scikit-image,
with train/ and val/ splits, for when no real dataset is at hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_PHOTOS = (
    'astronaut.png', 'chelsea.png', 'coffee.png', 'hubble_deep_field.jpg', 'ihc.png',
    'motorcycle_left.png', 'motorcycle_right.png', 'retina.jpg', 'rocket.jpg',
    'camera.png', 'coins.png', 'moon.png', 'brick.png', 'grass.png',
)


def _skimage_photo_dir() -> str:
    spec = importlib.util.find_spec('skimage')  # its files only; importing it is slow
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('error: --make-jpeg-tree needs scikit-image (pip install scikit-image) '
                         'for its bundled photos.')
    return os.path.join(spec.submodule_search_locations[0], 'data')


def make_jpeg_tree(root: str, num_images: int, *, num_classes: int = 10, val_fraction: float = 0.2,
                   seed: int = 0, max_side: int = 500) -> dict[str, int]:
    """Writes root/{train,val}/class_XX/NNNNN.jpg, ImageNet-like JPEGs from scikit-image's photos.

    Each image is a random crop (20-100% of the area, aspect 3/4-4/3) of one of the photos,
    resized so its longer side is 2/3..1 of `max_side` (ImageNet's JPEGs are mostly 500 px
    on the longer side), saved at quality 90. The grayscale photos stay grayscale, as some
    ImageNet JPEGs are. Returns the number of files per split.
    """
    import numpy as np
    from PIL import Image

    photo_dir = _skimage_photo_dir()
    photos = [Image.open(os.path.join(photo_dir, name)) for name in _PHOTOS]
    photos = [p.convert('L' if p.mode in ('L', 'I', 'I;16') else 'RGB') for p in photos]
    rng = np.random.default_rng(seed)
    counts = {'train': 0, 'val': 0}
    for i in range(num_images):
        split = 'val' if rng.random() < val_fraction else 'train'
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        area = rng.uniform(0.2, 1.0) * w * h
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        crop = photo.crop((left, top, left + cw, top + ch))
        longer = rng.uniform(2 / 3, 1.0) * max_side
        scale = longer / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))),
                           Image.Resampling.BICUBIC)
        folder = os.path.join(root, split, f'class_{i % num_classes:02d}')
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f'{i:06d}.jpg'), 'JPEG', quality=90)
        counts[split] += 1
    return counts


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its children (DataLoader workers).

    Live children are read with psutil; children that ended and were reaped are in
    `RUSAGE_CHILDREN`, so a worker that exits within a measurement still counts.
    """
    import resource

    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


def _flaxnets_iterator(args, split: str, train: bool, workers: int, repeat: int):
    import input_pipeline

    config = input_pipeline.default_data_config()
    config.data_dir = args.data_dir
    config.num_parallel_calls = workers
    config.crop_pct = args.crop_pct
    common = dict(dataset=args.dataset, split=split, global_batch_size=args.batch_size,
                  image_size=args.image_size, channels=3, mean=MEAN, std=STD,
                  process_index=0, process_count=1)
    if train:
        # A new start step each repeat, so the repeats time different examples.
        return input_pipeline.create_train_iterator(
            config, seed=0, start_step=repeat * (args.warmup + args.batches), **common)
    start_pass, _ = input_pipeline.create_eval_iterator(config, **common)

    def endless():
        while True:
            yield from start_pass()

    return endless()


def _torchvision_iterator(args, split: str, train: bool, workers: int, repeat: int):
    import math

    import torch
    from torchvision import datasets, transforms

    size = args.image_size
    if train:
        ops = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize(math.floor(size / args.crop_pct)), transforms.CenterCrop(size)]
    ops += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    root = os.path.join(os.path.expanduser(args.dataset[len('folder:'):]), split)
    dataset = datasets.ImageFolder(root, transform=transforms.Compose(ops))
    generator = torch.Generator().manual_seed(repeat)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=train, num_workers=workers, drop_last=True,
        generator=generator, prefetch_factor=2, persistent_workers=True)

    def endless():
        while True:
            yield from loader

    return endless()


class _EncodedImages:
    """A split as Grain's random-access data source: (encoded image bytes, label) by index."""

    def __init__(self, source):
        self.source = source
        labels = source.labels
        self.labels = np.asarray(labels() if callable(labels) else labels)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.source.encoded(int(i)), int(self.labels[i])


def _pil_rgb(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.convert('RGB') if image.mode != 'RGB' else image


def _normalised(image, size: int) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32).reshape(size, size, 3)
    return (pixels / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


class _GrainTrain:
    """Random-resized crop (area 8-100%, aspect 3/4-4/3, ten tries, then the centre), flip,
    normalise: the same recipe as ours and torchvision's, in PIL and NumPy per example."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, example, rng: np.random.Generator):
        from PIL import Image

        data, label = example
        image = _pil_rgb(data)
        w, h = image.size
        box = None
        for _ in range(10):
            area = rng.uniform(0.08, 1.0) * w * h
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                break
        if box is None:
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        # PIL crops and resizes in one call when given the box.
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _normalised(image, self.size), label


class _GrainEval:
    """Resize the shorter side to size / crop_pct, centre crop, normalise."""

    def __init__(self, size: int, crop_pct: float):
        self.size, self.resize = size, math.floor(size / crop_pct)

    def __call__(self, example):
        from PIL import Image

        data, label = example
        image = _pil_rgb(data)
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        x0, y0 = (w - self.size) // 2, (h - self.size) // 2
        return _normalised(image.crop((x0, y0, x0 + self.size, y0 + self.size)), self.size), label


def _grain_iterator(args, split: str, train: bool, workers: int, repeat: int):
    """Grain over the same random-access source as ours (files of a `folder:` tree, or a
    tfds split's ArrayRecord records), the per-example work in PIL and NumPy, whole batches
    made in `workers` worker processes (`mp_prefetch`, Grain's way to scale a CPU-bound map)."""
    import grain.python as grain
    from absl import flags

    import input_pipeline

    if not flags.FLAGS.is_parsed():  # Grain reads its options from absl flags
        flags.FLAGS.mark_as_parsed()

    config = input_pipeline.default_data_config()
    config.data_dir = args.data_dir
    source = _EncodedImages(input_pipeline.load_source(config, args.dataset, split))
    if len(source) == 0 or source.source.encoded(0) is None:
        raise SystemExit(f'error: --grain needs encoded images by index (a folder: tree or a '
                         f'tfds split in ArrayRecord files); {args.dataset} {split} has none.')
    dataset = grain.MapDataset.source(source)
    if train:
        dataset = dataset.shuffle(seed=repeat).repeat().random_map(_GrainTrain(args.image_size), seed=repeat)
    else:
        dataset = dataset.repeat().map(_GrainEval(args.image_size, args.crop_pct))
    dataset = dataset.batch(args.batch_size, drop_remainder=True)
    iterable = dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))

    def endless():
        yield from iterable

    return endless()


def _measure(make, args, split, train, workers, repeat) -> dict:
    iterator = make(args, split, train, workers, repeat)
    try:
        for _ in range(args.warmup):
            next(iterator)
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    finally:
        iterator.close()  # Ends the pass; the DataLoader's workers end with the loader.
    images = args.batches * args.batch_size
    return {'images_per_s': images / wall, 'images_per_cpu_s': images / max(cpu, 1e-9)}


def run(args) -> list[dict]:
    """Measures every (pipeline, stage, workers), interleaved; returns one row each."""
    is_folder = args.dataset.startswith('folder:')
    pipelines = [('flaxnets', _flaxnets_iterator)]
    if is_folder and args.torchvision:
        pipelines.append(('torchvision', _torchvision_iterator))
    if args.grain:
        pipelines.append(('grain', _grain_iterator))
    stages = [s for s in ('train', 'eval') if s in args.stages]
    configs = [(name, make, stage, w) for w in args.workers for stage in stages
               for name, make in pipelines]
    samples: dict[tuple, list[dict]] = {c[:1] + c[2:]: [] for c in configs}
    for repeat in range(args.repeats):
        for name, make, stage, workers in configs:
            split = args.train_split if stage == 'train' else args.eval_split
            result = _measure(make, args, split, stage == 'train', workers, repeat)
            samples[(name, stage, workers)].append(result)
            if args.verbose:
                print(f'  repeat {repeat}: {name} {stage} workers={workers}: '
                      f'{result["images_per_s"]:.1f} images/s, '
                      f'{result["images_per_cpu_s"]:.1f} images/CPU-s', file=sys.stderr)
    rows = []
    for (name, stage, workers), values in samples.items():
        rows.append({
            'pipeline': name, 'stage': stage, 'workers': workers,
            'images_per_s': statistics.median(v['images_per_s'] for v in values),
            'images_per_cpu_s': statistics.median(v['images_per_cpu_s'] for v in values),
            'repeats': len(values),
        })
    return rows


def _ratios(rows: list[dict]) -> list[dict]:
    """flaxnets / each other pipeline, for each (stage, workers) measured for both."""
    by_key = {(r['pipeline'], r['stage'], r['workers']): r for r in rows}
    out = []
    for r in rows:
        if r['pipeline'] != 'flaxnets':
            continue
        for other_name in ('torchvision', 'grain'):
            other = by_key.get((other_name, r['stage'], r['workers']))
            if other:
                out.append({
                    'versus': other_name, 'stage': r['stage'], 'workers': r['workers'],
                    'images_per_s': r['images_per_s'] / other['images_per_s'],
                    'images_per_cpu_s': r['images_per_cpu_s'] / other['images_per_cpu_s'],
                })
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', help="'folder:/root' or a tfds name")
    parser.add_argument('--data_dir', default=None, help='tfds data dir')
    parser.add_argument('--train-split', default='train')
    parser.add_argument('--eval-split', default='val',
                        help="eval split ('val' for folders; e.g. 'validation' for imagenet2012)")
    parser.add_argument('--stages', default='train,eval', help='train, eval or both')
    parser.add_argument('--workers', default='1,2', help='comma-separated worker counts')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--crop-pct', type=float, default=0.875)
    parser.add_argument('--batches', type=int, default=10, help='timed batches per measurement')
    parser.add_argument('--warmup', type=int, default=2, help='untimed batches first')
    parser.add_argument('--repeats', type=int, default=3, help='interleaved rounds (median)')
    parser.add_argument('--no-torchvision', dest='torchvision', action='store_false',
                        help='time only our pipeline')
    parser.add_argument('--grain', action='store_true',
                        help='also time Grain over the same random-access source (PIL, NumPy, '
                             'worker processes)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--verbose', action='store_true', help='print every measurement')
    parser.add_argument('--make-jpeg-tree', metavar='DIR',
                        help='write a folder: dataset of ImageNet-sized JPEGs and exit')
    parser.add_argument('--num-images', type=int, default=2000)
    args = parser.parse_args(argv)

    if args.make_jpeg_tree:
        counts = make_jpeg_tree(args.make_jpeg_tree, args.num_images)
        print(f'wrote {counts["train"]} train and {counts["val"]} val JPEGs under '
              f'{args.make_jpeg_tree}; use --dataset folder:{args.make_jpeg_tree}')
        return 0
    if not args.dataset:
        parser.error('--dataset is required (or --make-jpeg-tree DIR)')
    args.workers = [int(w) for w in args.workers.split(',')]
    args.stages = [s.strip() for s in args.stages.split(',')]
    if min(args.workers) < 1:
        parser.error('--workers must be >= 1')

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if args.torchvision and args.dataset.startswith('folder:'):
        # Before TensorFlow: torch's bundled triton crashes the interpreter when it loads
        # after TensorFlow's native libraries (see tools/inference.py).
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print('torchvision is not installed: timing only flaxnets (pip install torchvision, '
                  'or pass --no-torchvision).', file=sys.stderr)
            args.torchvision = False
    if args.grain and importlib.util.find_spec('grain') is None:
        print('grain is not installed: timing without it (pip install grain, or the [test] extra).',
              file=sys.stderr)
        args.grain = False
    rows = run(args)
    ratios = _ratios(rows)
    if args.json:
        print(json.dumps({'dataset': args.dataset, 'batch_size': args.batch_size,
                          'image_size': args.image_size, 'batches': args.batches,
                          'repeats': args.repeats, 'results': rows, 'ratios': ratios}))
        return 0
    print(f'{args.dataset}: batch {args.batch_size}, {args.image_size} px, median of '
          f'{args.repeats} interleaved repeats of {args.batches} batches')
    print(f'{"pipeline":<12} {"stage":<6} {"workers":>7} {"images/s":>10} {"images/CPU-s":>13}')
    for r in rows:
        print(f'{r["pipeline"]:<12} {r["stage"]:<6} {r["workers"]:>7} '
              f'{r["images_per_s"]:>10.1f} {r["images_per_cpu_s"]:>13.1f}')
    for r in ratios:
        print(f'flaxnets / {r["versus"]}, {r["stage"]}, {r["workers"]} workers: '
              f'{r["images_per_s"]:.2f}x images/s, {r["images_per_cpu_s"]:.2f}x images/CPU-s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
