"""Top-k classes with probabilities for image files, or for every image of a split.

    python tools/predict.py --workdir /tmp/flaxnets/default digit.png other.jpg
    python tools/predict.py --workdir /tmp/flaxnets/default --ema --top-k 3 --json *.png
    python tools/predict.py --workdir /tmp/flaxnets/default --split test --json   # whole split
    python tools/predict.py --model resnet50 --weights resnet50.safetensors cat.jpg

Images go through the eval transform of the model's config (the run's `config.data`:
resize/centre-crop or LeNet's zero padding, normalisation, channel conversion), exactly as
`train.py` evaluates. For datasets stored at a fixed size (`mnist5k`, CIFAR) with the
'small' transform, files are read as the dataset's arrays are, so a 28x28 PNG of a digit
is zero-padded to 32x32 like the training digits were.

Class names come from the run's `labels.json` (written by every training run: tfds
metadata names or the `folder:` dataset's class folders), else from `--dataset`'s
metadata; a 1,000-class model without either gets ImageNet's WordNet ids from tfds
(with their words when timm's synset file is installed); otherwise class indices.

`--split NAME` predicts every image of a dataset split instead of files (the run's
dataset unless `--dataset`) and, the labels being known, also reports the top-1 accuracy
of the predictions, which equals `tools/evaluate.py`'s. `--json` prints one JSON object
(`predictions`: image, label, top_k [{class, name, probability}]).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import inference  # noqa: E402
from tools.inference import ToolError  # noqa: E402

# PIL modes kept as they are (the pipeline converts channels as it does for datasets).
_NATIVE_MODES = {'L': 1, 'RGB': 3, 'RGBA': 4}


def read_images(paths: list[str]) -> list:
    """Decodes every file with PIL up front, so a bad file fails before any model loads."""
    import numpy as np
    from PIL import Image

    arrays = []
    for path in paths:
        if not os.path.isfile(path):
            raise ToolError(f'Image {path} does not exist; give paths of image files.')
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode not in _NATIVE_MODES:
                    img = img.convert('L' if img.mode in ('1', 'LA', 'I', 'I;16', 'F') else 'RGB')
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise ToolError(f'Cannot read image {path} ({e}); give JPEG, PNG, BMP, GIF or WebP '
                            'files that open in an image viewer.') from e
        arrays.append(array.reshape(*array.shape[:2], -1))
    return arrays


def image_sources(paths: list[str], arrays: list, data: inference.DataSettings) -> list:
    """[(indices into paths, ArraySource)] shaped as the model's dataset is read.

    With the 'small' transform the pipeline zero-pads images whose size is known up front
    (a fixed-size dataset's arrays) and resizes the others (files, encoded images). Files
    for a fixed-size dataset are therefore fed as arrays, grouped by shape, and files for
    anything else as files, so each takes the path its dataset's images took.
    """
    import numpy as np

    from input_pipeline import ArraySource

    fixed = (data.data_config.preprocess == 'small' and data.info is not None
             and all(d is not None for d in data.info.image_shape))
    if not fixed:
        return [(list(range(len(paths))),
                 ArraySource('files', np.array([os.path.abspath(p) for p in paths]),
                             np.zeros(len(paths), np.int32)))]
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    return [(idx, ArraySource('array', np.stack([arrays[i] for i in idx]),
                              np.zeros(len(idx), np.int32)))
            for idx in groups.values()]


def make_predict_fn(model, mesh, k: int):
    """Jitted (params, stats, images) -> (top-k probabilities, top-k classes).

    Classes are the top-k logits (the same order and tie-breaking as the eval step's
    top-1/top-5), probabilities the softmax at those classes."""
    import jax
    import jax.numpy as jnp

    from trainers import core

    def fn(params, stats, images):
        logits = model.apply(core.model_variables(params, stats), images, train=False)
        logits = logits.astype(jnp.float32)
        _, idx = jax.lax.top_k(logits, k)
        probs = jnp.take_along_axis(jax.nn.softmax(logits), idx, axis=-1)
        return probs, idx

    return jax.jit(fn, in_shardings=(None, None, core.batch_sharding(mesh)),
                   out_shardings=core.replicated(mesh))


def run_predictions(predict_fn, params, stats, make_iter, mesh):
    """(probs, classes, labels) of the real (unpadded) rows of one eval pass, in order."""
    import numpy as np

    from trainers import core

    probs, classes, labels = [], [], []
    for batch in make_iter():
        real = batch['mask'] > 0
        image = core.to_global({'image': batch['image']}, core.batch_sharding(mesh))['image']
        p, c = predict_fn(params, stats, image)
        probs.append(np.asarray(p)[real])
        classes.append(np.asarray(c)[real])
        labels.append(batch['label'][real])
    return np.concatenate(probs), np.concatenate(classes), np.concatenate(labels)


def predict(args) -> int:
    import json

    if bool(args.images) == bool(args.split):
        raise ToolError('Give image files to classify, or --split NAME to classify a dataset '
                        'split (not both).')
    inference.check_source_args(args)
    if args.top_k < 1:
        raise ToolError('--top-k must be at least 1.')
    arrays = read_images(args.images) if args.images else []
    inference.import_reference_libraries(
        (args.weights or '').lower().endswith(inference.TORCH_SUFFIXES))
    source = inference.load_source(args)
    data = inference.resolve_data(args, source, need_split=bool(args.split))
    names, names_from = inference.class_names(source, data)
    wordnet_ids = names and all(re.fullmatch(r'n\d{8}', n) for n in names)
    descriptions = inference.imagenet_descriptions() if wordnet_ids else {}

    import jax
    import numpy as np

    import input_pipeline
    from trainers import core

    if jax.process_count() > 1:
        raise ToolError('predict.py runs in a single process.')
    model = inference.create_model(source)
    mesh = core.create_mesh()
    params, stats = inference.device_variables(source, mesh)
    k = min(args.top_k, source.num_classes)
    predict_fn = make_predict_fn(model, mesh, k)
    common = dict(data.pipeline_kwargs(), data_config=data.data_config)
    n_dev = jax.device_count()
    if args.split:
        make_iter, _ = input_pipeline.create_eval_iterator(
            dataset=data.dataset, split=data.split, global_batch_size=data.batch_size, **common)
        probs, classes, labels = run_predictions(predict_fn, params, stats, make_iter, mesh)
        items = [f'{data.dataset} {data.split}[{i}]' for i in range(len(labels))]
    else:
        n = len(args.images)
        batch = min(data.batch_size, -(-n // n_dev) * n_dev)
        probs = np.zeros((n, k), np.float32)
        classes = np.zeros((n, k), np.int32)
        for idx, src in image_sources(args.images, arrays, data):
            make_iter, _ = input_pipeline.create_eval_iterator(
                dataset=data.dataset or 'images', split='files', global_batch_size=batch,
                source=src, **common)
            p, c, _ = run_predictions(predict_fn, params, stats, make_iter, mesh)
            probs[idx], classes[idx] = p, c
        labels, items = None, list(args.images)

    def name(c: int) -> str | None:
        return names[c] if names else None

    predictions = []
    for i, item in enumerate(items):
        top = []
        for p, c in zip(probs[i], classes[i], strict=True):
            entry = {'class': int(c), 'name': name(int(c)), 'probability': float(p)}
            if descriptions.get(entry['name']):
                entry['description'] = descriptions[entry['name']]
            top.append(entry)
        predictions.append({'image': item, 'label': None if labels is None else int(labels[i]),
                            'top_k': top})
    out = {
        'model': source.model_name, 'weights': source.description, 'class_names': names_from,
        'image_size': data.image_size, 'num_images': len(predictions),
    }
    if labels is not None:
        out['dataset'], out['split'] = data.dataset, data.split
        out['top1_accuracy'] = float(np.mean(classes[:, 0] == labels))
    if args.json:
        print(json.dumps({**out, 'predictions': predictions}))
        return 0
    print(f"{source.model_name} from {source.description}; {data.image_size} px; class names: "
          f"{names_from}")
    for pred in predictions:
        truth = '' if pred['label'] is None else f"  (label {name(pred['label']) or pred['label']})"
        print(f"{pred['image']}{truth}")
        for e in pred['top_k']:
            label = e['name'] if e['name'] is not None else f"class {e['class']}"
            if 'description' in e:
                label = f"{label} {e['description']}"
            print(f"  {100 * e['probability']:6.2f}%  {label}")
    if labels is not None:
        print(f"top-1 accuracy {out['top1_accuracy']:.4f} on {len(labels):,} labelled images")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='*', help='image files (JPEG, PNG, ...)')
    inference.add_source_args(parser)
    parser.add_argument('--top-k', type=int, default=5, help='classes shown per image')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    args = parser.parse_args(argv)
    return inference.run_cli(lambda: predict(args), args.verbose)


if __name__ == '__main__':
    sys.exit(main())
