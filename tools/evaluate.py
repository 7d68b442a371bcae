"""Evaluate a run's checkpoint, or any weights, on any dataset split (timm's validate.py).

    python tools/evaluate.py --workdir /tmp/flaxnets/default                 # newest checkpoint
    python tools/evaluate.py --workdir /tmp/flaxnets/default --step 1000 --ema
    python tools/evaluate.py --workdir /tmp/flaxnets/default --dataset digits --split test
    python tools/evaluate.py --model resnet50 --weights resnet50.safetensors \\
        --dataset imagenet2012 --split validation --compare-reference

Prints and writes top-1, top-5, loss (mean cross-entropy), the example count and images/s.
With a run, the defaults (dataset, eval split, eval transform, resolution, eval batch,
compute dtype) come from its `config.json`, so the numbers equal the run's own final
evaluation; the record goes to `<workdir>/eval_[<dataset>_]<split>[_ema]_<step>.json`
(the dataset only when it is not the run's), never to `results.json`. With a weights
file the record goes next to it (`<file stem>.eval_<dataset>_<split>.json`); `--out`
chooses another path.

The pass runs sharded over every local device with the trainers' own eval step
(`trainers/core.py`: mesh, `make_eval_step`, `evaluate`, device prefetch), so padded last
batches are masked exactly as in training. images/s counts the timed pass (input pipeline
included, compilation excluded: one warm-up batch runs first).

`--compare-reference` builds timm's (else torchvision's) model of the same name, loads the
same weights (a reference weights file as given, or our variables exported with
`models.export_state_dict`), runs it on exactly the images our model saw and prints the
top-1 agreement, the largest |logit difference| and the reference's own top-1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import inference  # noqa: E402
from tools.inference import ToolError  # noqa: E402


def output_path(args, source: inference.Source, data: inference.DataSettings) -> str:
    if args.out:
        return args.out
    parts = []
    run_dataset = (source.run_config or {}).get('dataset')
    if source.run_config is None or data.dataset != run_dataset:
        parts.append(data.dataset)
    parts.append(data.split)
    if source.ema:
        parts.append('ema')
    if source.step is not None:
        parts.append(str(source.step))
    name = '_'.join(re.sub(r'[^A-Za-z0-9.%-]+', '-', p).strip('-') for p in parts)
    return os.path.join(source.output_dir, f'{source.output_stem}eval_{name}.json')


def warm_up(eval_step, params, stats, data: inference.DataSettings, mesh) -> float:
    """Compiles the eval step on an all-padding batch; returns the seconds it took."""
    import jax
    import numpy as np

    from trainers import core

    local = data.batch_size // jax.process_count()
    batch = core.to_global({
        'image': np.zeros((local, data.image_size, data.image_size, data.channels), np.float32),
        'label': np.zeros((local,), np.int32),
        'mask': np.zeros((local,), np.float32),
    }, core.batch_sharding(mesh))
    t = time.perf_counter()
    jax.block_until_ready(eval_step(params, stats, batch))
    return time.perf_counter() - t


def build_reference(source: inference.Source):
    """(torch model loaded with the source's weights, library name), or a ToolError."""
    import numpy as np

    import models
    from tools.convert_weights import reference_model

    state = source.state_dict
    if state is None:
        try:
            state = models.export_state_dict(source.model_name, source.variables)
        except (models.ConversionError, NotImplementedError) as e:
            raise ToolError(f'--compare-reference: {source.model_name} has no reference name '
                            f'map ({e}); drop --compare-reference.') from e
    reference, lib = reference_model(source.model_name, source.num_classes, state)
    if reference is None:
        fix = ('pip install torch timm torchvision (the [test] extra)' if 'installed' in lib
               else 'only models that timm or torchvision also define can be compared')
        raise ToolError(f'--compare-reference: {lib}; {fix}, or drop --compare-reference.')
    import torch

    missing, unexpected = reference.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise ToolError(f'--compare-reference: {lib} {source.model_name} does not take these '
                        f'weights (missing {missing[:3]}, unexpected {unexpected[:3]}).')
    return reference, lib


def compare_reference(reference, lib: str, model, params, stats, make_iter, mesh) -> dict:
    """Our logits vs the reference implementation's on the same preprocessed images."""
    import jax
    import numpy as np
    import torch

    from trainers import core

    reference.eval()
    logits_fn = jax.jit(
        lambda p, s, x: model.apply(core.model_variables(p, s), x, train=False),
        in_shardings=(None, None, core.batch_sharding(mesh)), out_shardings=core.replicated(mesh))
    sharding = core.batch_sharding(mesh)
    agree = total = ref_correct = 0
    max_diff = 0.0
    for batch in make_iter():
        real = batch['mask'] > 0
        ours = np.asarray(logits_fn(params, stats, core.to_global({'image': batch['image']}, sharding)['image']))
        with torch.no_grad():
            out = reference(torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2))))
            theirs = (out[0] if isinstance(out, tuple) else out).float().numpy()
        ours, theirs, labels = ours[real], theirs[real], batch['label'][real]
        agree += int(np.sum(ours.argmax(-1) == theirs.argmax(-1)))
        ref_correct += int(np.sum(theirs.argmax(-1) == labels))
        total += int(real.sum())
        if len(ours):
            max_diff = max(max_diff, float(np.max(np.abs(ours.astype(np.float32) - theirs))))
    return {'library': lib, 'top1_agreement': agree / total, 'max_abs_logit_diff': max_diff,
            'reference_top1': ref_correct / total, 'num_examples': total}


def evaluate(args) -> int:
    import json

    inference.check_source_args(args)
    needs_torch = args.compare_reference or (args.weights or '').lower().endswith(inference.TORCH_SUFFIXES)
    inference.import_reference_libraries(needs_torch)
    source = inference.load_source(args)
    data = inference.resolve_data(args, source, need_split=True)

    import jax

    import input_pipeline
    from trainers import core

    if jax.process_count() > 1 and args.compare_reference:
        raise ToolError('--compare-reference runs in a single process.')
    reference = build_reference(source) if args.compare_reference else None  # fails fast
    model = inference.create_model(source)
    mesh = core.create_mesh()
    params, stats = inference.device_variables(source, mesh)
    eval_step = core.make_eval_step(model, mesh)
    make_iter, num_examples = input_pipeline.create_eval_iterator(
        data.data_config, dataset=data.dataset, split=data.split, global_batch_size=data.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **data.pipeline_kwargs())
    compile_s = warm_up(eval_step, params, stats, data, mesh)
    t = time.perf_counter()
    batches = core.prefetch_to_device(make_iter(), core.batch_sharding(mesh))
    metrics = core.evaluate(eval_step, params, stats, batches)
    seconds = time.perf_counter() - t
    record = {
        'model': source.model_name,
        'model_kwargs': source.overrides,
        'weights': source.description,
        'step': source.step,
        'ema': source.ema,
        'dataset': data.dataset,
        'split': data.split,
        'image_size': data.image_size,
        'batch_size': data.batch_size,
        'compute_dtype': source.compute_dtype,
        'devices': jax.device_count(),
        'backend': jax.default_backend(),
        **metrics,
        'images_per_sec': round(metrics['num_examples'] / seconds, 1),
        'eval_time_s': round(seconds, 3),
        'compile_time_s': round(compile_s, 3),
    }
    if args.compare_reference:
        record['reference'] = compare_reference(*reference, model, params, stats, make_iter, mesh)
    path = output_path(args, source, data)
    if jax.process_index() == 0:
        try:
            with open(path + '.tmp', 'w') as f:
                json.dump(record, f, indent=2)
            os.replace(path + '.tmp', path)
        except OSError as e:
            print(json.dumps(record))  # the numbers are not lost
            raise ToolError(f'Cannot write {path} ({e.strerror}); choose a writable file with --out.') from e
    if args.json:
        print(json.dumps({**record, 'output': path}))
        return 0
    print(f"{source.model_name} from {source.description}")
    print(f"  {data.dataset} {data.split}: {metrics['num_examples']:,} images at {data.image_size} px, "
          f"batch {data.batch_size}, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"  top-1 {metrics['top1']:.4f} | top-5 {metrics['top5']:.4f} | loss {metrics['loss']:.4f} | "
          f"{record['images_per_sec']:,.1f} images/s ({seconds:.2f} s; compile {compile_s:.2f} s)")
    if 'reference' in record:
        r = record['reference']
        print(f"  vs {r['library']}: top-1 agreement {r['top1_agreement']:.4f} | max |logit diff| "
              f"{r['max_abs_logit_diff']:.3g} | reference top-1 {r['reference_top1']:.4f}")
    print(f'  wrote {path}')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inference.add_source_args(parser)
    parser.add_argument('--compare-reference', action='store_true',
                        help='also run the timm/torchvision model on the same images')
    parser.add_argument('--out', help='JSON record path (default: next to the checkpoint)')
    parser.add_argument('--json', action='store_true', help='print the record as one JSON object')
    args = parser.parse_args(argv)
    return inference.run_cli(lambda: evaluate(args), args.verbose)


if __name__ == '__main__':
    sys.exit(main())
