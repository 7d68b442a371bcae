"""Noisy Student training (Xie et al. 2020): `config.trainer = 'noisy_student'`.

"Self-training with Noisy Student improves ImageNet classification", CVPR 2020, Alg. 1:

1. Train a teacher on the labeled data (round 0), or restore one with
   `config.teacher.checkpoint`: a workdir / orbax checkpoint of our own, or converted
   reference weights (`.npz` / `.safetensors` in timm or torchvision naming).
2. Pseudo-label the unlabeled data with the teacher in eval mode and clean (eval)
   preprocessing. Inference is sharded over every device and process; logits are written
   in shards with a manifest, so an interrupted inference resumes without redoing
   finished shards.
3. Filter and balance: keep images whose top-1 probability is at least `min_confidence`;
   per class keep the `images_per_class` most confident, duplicating when a class has
   fewer (as the paper does for ImageNet, Sec. 3.1).
4. Train an equal-or-larger student from scratch *with noise* (RandAugment, dropout,
   stochastic depth: whatever `config.data` and `config.model_kwargs` set) on batches of
   `batch_size` labeled and `unlabeled_ratio * batch_size` pseudo-labeled images, with
   soft (temperature `temperature`) or hard targets. The loss is
   mean_labeled(CE) + unlabeled_weight * mean_pseudo(CE), through one forward pass (so
   BatchNorm sees both).
5. The student becomes the next round's teacher; `num_iterations` rounds.

Everything lives under the workdir by round (`round_0/teacher`, `round_r/pseudo_labels`,
`round_r/student`); each training is an ordinary supervised run (checkpoints, metrics,
resume), and a stopped run resumes at the round and step where it stopped. The top-level
`results.json` holds `rounds`: one object per round with the held-out `teacher_top1` and
`student_top1` (fractions), and `top1`, the last student's.

Not implemented: the paper's optional online variant (teacher inside the student step).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import input_pipeline
import models
from flaxnets_errors import ConfigError
from trainers import configuration, core, supervised, weights
from trainers.checkpointing import load_state_arrays
from trainers.progress import Progress
from trainers.workdir import RunOptions, open_run

# Fine-tuning from pretrained weights is a supervised-trainer mode only.
CONFIG_KEYS = (configuration.SUPERVISED_KEYS - configuration.FINETUNE_KEYS) | frozenset(
    {'teacher', 'unlabeled_dataset', 'unlabeled_split', 'noisy_student'}
)
TEACHER_KEYS = frozenset({'model', 'model_kwargs', 'data', 'num_train_steps', 'checkpoint'})
NS_KEYS = frozenset({
    'num_iterations', 'min_confidence', 'images_per_class', 'soft_labels', 'temperature',
    'unlabeled_ratio', 'unlabeled_weight', 'inference_shard_size',
})


# ----------------------------------------------------------------------------- filtering


def filter_and_balance(
    probs: np.ndarray, min_confidence: float, images_per_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selects pseudo-labeled examples as Noisy Student does.

    Args:
      probs: (N, K) teacher probabilities.
      min_confidence: keep examples whose top-1 probability is at least this.
      images_per_class: per predicted class, keep the most confident this many, and
        repeat a class's examples (most confident first, cyclically) when it has fewer.
        0 keeps every confident example unbalanced.

    Returns:
      (indices into probs, possibly repeated; per-class counts of the confident examples
      before balancing; per-class counts after).
    """
    num_classes = probs.shape[1]
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    kept = np.nonzero(conf >= min_confidence)[0]
    before = np.bincount(pred[kept], minlength=num_classes)
    if images_per_class <= 0:
        return kept, before, before.copy()
    chosen = []
    for c in range(num_classes):
        idx = kept[pred[kept] == c]
        if not len(idx):
            continue
        idx = idx[np.argsort(-conf[idx], kind='stable')]
        chosen.append(idx[:images_per_class] if len(idx) >= images_per_class
                      else np.resize(idx, images_per_class))
    selected = np.concatenate(chosen) if chosen else np.zeros((0,), np.int64)
    return selected, before, np.bincount(pred[selected], minlength=num_classes)


def pseudo_targets(logits: np.ndarray, soft: bool, temperature: float) -> np.ndarray:
    """Soft targets softmax(logits / T), or one-hot argmax targets."""
    if soft:
        z = logits / temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return np.eye(logits.shape[1], dtype=np.float32)[logits.argmax(axis=1)]


# ----------------------------------------------------------------------------- inference


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _load_manifest(path: str, identity: dict) -> dict:
    """The shard manifest when it was written for this teacher and data, else a new one."""
    manifest = {**identity, 'shards': {}}
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        if all(found.get(k) == v for k, v in identity.items()):
            return found
        logging.warning('Discarding pseudo-label shards in %s: made by another teacher or for '
                        'other data.', os.path.dirname(path))
    return manifest


def _shard_logits(apply, variables, batches, on_batch) -> np.ndarray:
    """Logits of every example of the batches, in order, without the padding rows. An
    image that could not be decoded (`valid` 0) gets NaN logits: no confidence reaches
    `min_confidence`, so it is never pseudo-labelled."""
    outs, masks, valids = [], [], []
    for i, batch in enumerate(batches):
        outs.append(apply(variables, batch['image']))
        masks.append(batch['mask'])
        valids.append(batch['valid'] if 'valid' in batch else batch['mask'] * 0 + 1)
        on_batch(i, outs[-1])
    logits = np.concatenate(jax.device_get(outs)).astype(np.float32)
    mask = np.concatenate([np.asarray(jax.device_get(m)) for m in masks]) > 0
    valid = np.concatenate([np.asarray(jax.device_get(v)) for v in valids]) > 0
    logits[~valid] = np.nan
    return logits[mask | ~valid]


def infer_logits(
    model,
    variables: dict,
    source,
    out_dir: str,
    *,
    data_config,
    dataset: str,
    split: str,
    batch_size: int,
    shard_size: int,
    image_size: int,
    channels: int,
    mean,
    std,
    teacher_id: str,
) -> np.ndarray:
    """Teacher logits for every example of `source`, written as resumable shards.

    Shard k holds examples [k * shard_size, (k + 1) * shard_size) of the source, as
    `shard-0000k.npz` (arrays `index`, `logits`); `manifest.json` lists finished shards
    with their sha256. A shard listed with a matching file is not recomputed; a manifest
    written for another teacher or another source is discarded (and its shards redone).
    Only process 0 writes; every process returns the full array.
    """
    mesh = core.create_mesh()
    sharding = core.batch_sharding(mesh)
    apply = core.mesh_jit(
        lambda v, x: model.apply(v, x, train=False), mesh,
        in_shardings=(None, sharding), out_shardings=core.replicated(mesh),
    )
    n = len(source)
    num_shards = -(-n // shard_size)
    main = jax.process_index() == 0
    manifest_path = os.path.join(out_dir, 'manifest.json')
    manifest = _load_manifest(manifest_path, {'teacher': teacher_id, 'num_examples': n,
                                              'shard_size': shard_size, 'dataset': dataset, 'split': split})
    if main:
        os.makedirs(out_dir, exist_ok=True)

    def finished(k: int) -> bool:
        path, entry = os.path.join(out_dir, f'shard-{k:05d}.npz'), manifest['shards'].get(str(k))
        return bool(entry) and os.path.exists(path) and weights.file_sha256(path) == entry['sha256']

    todo = [k for k in range(num_shards) if not finished(k)]
    progress = Progress(f'Pseudo-labelling {dataset} {split}', sum(
        min((k + 1) * shard_size, n) - k * shard_size for k in todo), 'images')
    done_images, t0 = 0, time.time()
    for k in todo:
        path = os.path.join(out_dir, f'shard-{k:05d}.npz')
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        start_pass, count = input_pipeline.create_eval_iterator(
            data_config, dataset=dataset, split=split, global_batch_size=batch_size,
            image_size=image_size, channels=channels, mean=mean, std=std,
            source=source.select(np.arange(lo, hi)),
        )
        logits = _shard_logits(apply, variables, core.prefetch_to_device(start_pass(), sharding),
                               lambda i, out, lo=lo, hi=hi: progress.update(
                                   min(batch_size, hi - lo - i * batch_size), wait=out))
        assert len(logits) == hi - lo == count, (len(logits), hi - lo, count)
        if main:
            tmp = path + '.tmp.npz'
            np.savez(tmp, index=np.arange(lo, hi), logits=logits.astype(np.float32))
            os.replace(tmp, path)
            manifest['shards'][str(k)] = {'sha256': weights.file_sha256(path), 'count': hi - lo}
            _atomic_write_json(manifest_path, manifest)
        done_images += hi - lo
    progress.close()
    if done_images:
        rate = done_images / max(time.time() - t0, 1e-9)
        logging.info('Pseudo-labelled %d images at %.1f images/s.', done_images, rate)
        manifest['images_per_sec'] = rate
        if main:
            _atomic_write_json(manifest_path, manifest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('noisy_student_inference_done')
    return _read_shards(out_dir, num_shards, n)


def _read_shards(out_dir: str, num_shards: int, n: int) -> np.ndarray:
    parts = []
    for k in range(num_shards):
        with np.load(os.path.join(out_dir, f'shard-{k:05d}.npz')) as z:
            parts.append(z['logits'])
    return np.concatenate(parts) if parts else np.zeros((n, 0), np.float32)


# ----------------------------------------------------------------------------- configs


def _derived(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A supervised config from the Noisy Student one: NS keys dropped, `changes` set."""
    return configuration.derived(config, CONFIG_KEYS - configuration.SUPERVISED_KEYS, **changes)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    t = config.teacher
    return _derived(
        config, model=t.model, model_kwargs=ml_collections.ConfigDict(t.model_kwargs.to_dict()),
        data=ml_collections.ConfigDict(t.data.to_dict()), num_train_steps=t.num_train_steps,
    )


def _validate(config: ml_collections.ConfigDict) -> None:
    configuration.validate_config(config, CONFIG_KEYS)
    configuration.check_sections(config, {'teacher': TEACHER_KEYS, 'noisy_student': NS_KEYS}, 'Noisy Student')
    b_u = int(round(config.noisy_student.unlabeled_ratio * config.batch_size))
    core.check_batch_size('batch_size', config.batch_size)
    core.check_batch_size('unlabeled_ratio * batch_size', b_u)


def _read_results(workdir: str) -> dict | None:
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _teacher_variables(directory: str, model_name: str, num_classes: int) -> tuple[dict, str]:
    """The teacher's variables and an id for the manifest.

    `directory` is a workdir or checkpoints/ folder (newest orbax checkpoint), or a
    weights file in the reference's state-dict naming (any format `config.init_from`
    reads: `.safetensors`, `.npz`, BiT `.npz`, PyTorch with weights_only), converted
    strictly.
    """
    if directory.lower().endswith(weights.WEIGHT_SUFFIXES):
        state_dict = weights.read_state_dict(directory)
        variables = models.convert_state_dict(model_name, state_dict, num_classes=num_classes)
        return variables, f'{os.path.abspath(directory)}@{weights.file_sha256(directory)[:16]}'
    ckpt_dir = os.path.join(directory, 'checkpoints')
    if not os.path.isdir(ckpt_dir):
        ckpt_dir = directory
    step, state = load_state_arrays(ckpt_dir)
    variables = core.model_variables(state['params'], state.get('batch_stats', {}))
    return variables, f'{os.path.abspath(ckpt_dir)}@{step}'


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       options: RunOptions | None = None) -> dict[str, Any]:
    """Runs (or resumes) `num_iterations` Noisy Student rounds; returns the results."""
    _validate(config)
    info = input_pipeline.get_dataset_info(config.dataset, config.data.data_dir, config.data.download)
    configuration.check_data(config, [(config.dataset, config.train_split), (config.dataset, config.eval_split),
                                      (config.unlabeled_dataset, config.unlabeled_split)])

    # The unlabeled pool: a dataset split, minus the labeled examples when it is the
    # labeled split itself (labels of the pool are never read).
    unlabeled = input_pipeline.load_source(config.data, config.unlabeled_dataset, config.unlabeled_split)
    if (config.unlabeled_dataset, config.unlabeled_split) == (config.dataset, config.train_split):
        if config.get('labeled_per_class', 0):
            labeled_idx = input_pipeline.per_class_indices(unlabeled.labels, config.labeled_per_class)
            unlabeled = unlabeled.select(np.setdiff1d(np.arange(len(unlabeled)), labeled_idx))
        else:
            logging.warning('The unlabeled pool is the whole labeled split.')

    with open_run(workdir, config, info.class_names, options):
        return _rounds(config, workdir, info, unlabeled, options)


def _recorded_rounds(path: str) -> set[int]:
    """Rounds already in the top-level metrics.jsonl (a resumed run does not repeat them)."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)['round'] for line in f if '"split": "round"' in line}


def _pseudo_labels(config, r: int, round_dir: str, teacher_dir: str, teacher_model_name: str,
                   teacher_kwargs, info, unlabeled):
    """Round r's pseudo-labelled pool: teacher logits on the unlabeled data (resumable
    shards), filtered and balanced. Returns (pool source with targets, selected indices,
    per-class counts after balancing)."""
    ns = config.noisy_student
    eval_batch = core.eval_batch_size(config.get('eval_batch_size') or config.batch_size)
    teacher = models.create_model(
        teacher_model_name, num_classes=info.num_classes,
        **{k: v for k, v in dict(teacher_kwargs).items() if v is not None},
    )
    variables, teacher_id = _teacher_variables(teacher_dir, teacher_model_name, info.num_classes)
    teacher_cfg = models.get_model_cfg(teacher_model_name)
    t_size = config.get('image_size') or teacher_cfg.input_size[0]
    logits = infer_logits(
        teacher, variables, unlabeled, os.path.join(round_dir, 'pseudo_labels'),
        data_config=config.data, dataset=config.unlabeled_dataset, split=config.unlabeled_split,
        batch_size=eval_batch, shard_size=ns.inference_shard_size, image_size=t_size,
        channels=teacher_cfg.input_size[2], mean=teacher_cfg.mean, std=teacher_cfg.std,
        teacher_id=teacher_id,
    )
    probs = pseudo_targets(logits, soft=True, temperature=1.0)
    selected, before, after = filter_and_balance(probs, ns.min_confidence, ns.images_per_class)
    logging.info('Round %d pseudo-labels: %d of %d confident; per class before %s, after %s.',
                 r, int(before.sum()), len(probs), before.tolist(), after.tolist())
    if not len(selected):
        raise ConfigError(
            f'No unlabeled example reached min_confidence={ns.min_confidence} in round {r}; '
            f'lower config.noisy_student.min_confidence.'
        )
    targets = pseudo_targets(logits[selected], ns.soft_labels, ns.temperature)
    pseudo = unlabeled.select(selected, extras={'targets': targets})
    if jax.process_index() == 0:
        _atomic_write_json(os.path.join(round_dir, 'pseudo_labels', 'filter.json'), {
            'num_unlabeled': len(probs), 'num_confident': int(before.sum()),
            'num_selected': int(len(selected)), 'histogram_before': before.tolist(),
            'histogram_after': after.tolist(),
        })

    return pseudo, selected, after


def _rounds(config, workdir: str, info, unlabeled, options) -> dict[str, Any]:
    main = jax.process_index() == 0
    rounds: list[dict] = []
    summary_path = os.path.join(workdir, 'metrics.jsonl')
    recorded = _recorded_rounds(summary_path) if main else set()

    # Round 0's teacher.
    if config.teacher.checkpoint:
        teacher_dir = config.teacher.checkpoint
        teacher_model_name, teacher_kwargs = config.teacher.model, config.teacher.model_kwargs
        teacher_top1 = None
    else:
        teacher_dir = os.path.join(workdir, 'round_0', 'teacher')
        results = _read_results(teacher_dir)
        if results is None or results.get('step') != config.teacher.num_train_steps:
            results = supervised.train_and_evaluate(teacher_config(config), teacher_dir, options=options)
        teacher_model_name, teacher_kwargs = config.teacher.model, config.teacher.model_kwargs
        teacher_top1 = results['top1']

    for r in range(config.noisy_student.num_iterations):
        round_dir = os.path.join(workdir, f'round_{r}')
        pseudo, selected, after = _pseudo_labels(config, r, round_dir, teacher_dir, teacher_model_name,
                                                 teacher_kwargs, info, unlabeled)
        student_dir = os.path.join(round_dir, 'student')
        student_results = _read_results(student_dir)
        if student_results is None or student_results.get('step') != config.num_train_steps:
            student_results = supervised.train_and_evaluate(
                _derived(config), student_dir,
                train_iterator_fn=mixed_iterator_fn(config, pseudo, info.num_classes, seed_offset=r),
                options=options,
            )
        record = {'round': r, 'teacher_top1': teacher_top1, 'student_top1': student_results['top1'],
                  'num_pseudo_labeled': int(len(selected)), 'histogram_after': after.tolist()}
        rounds.append(record)
        if main and r not in recorded:
            with open(summary_path, 'a') as f:
                f.write(json.dumps({'step': r, 'split': 'round', **record}) + '\n')
        logging.info('Round %d: teacher top1 %s, student top1 %.4f', r, teacher_top1, student_results['top1'])
        teacher_dir, teacher_top1 = student_dir, student_results['top1']
        teacher_model_name, teacher_kwargs = config.model, config.model_kwargs

    results = {
        'trainer': 'noisy_student', 'model': config.model, 'teacher_model': config.teacher.model,
        'dataset': config.dataset, 'split': config.eval_split, 'rounds': rounds,
        'top1': rounds[-1]['student_top1'] if rounds else teacher_top1,
    }
    if main:
        _atomic_write_json(os.path.join(workdir, 'results.json'), results)
    return results


def mixed_iterator_fn(config, pseudo, num_classes: int, seed_offset: int = 0):
    """The student's batches: `batch_size` labeled + `unlabeled_ratio * batch_size`
    pseudo-labeled examples per step, with targets and loss weights.

    Both streams are functions of (seed, step), so the student resumes exactly. Weights
    are normalised by the *global* sizes, so the loss is
    mean_labeled(CE) + unlabeled_weight * mean_pseudo(CE) on any number of processes.
    """
    ns = config.noisy_student
    b_l = config.batch_size
    b_u = int(round(ns.unlabeled_ratio * b_l))

    def make(start_step: int, pipe_kw: dict):
        labeled = input_pipeline.create_train_iterator(
            config.data, dataset=config.dataset, split=config.train_split, global_batch_size=b_l,
            seed=config.seed, start_step=start_step, source=configuration.labeled_source(config),
            **pipe_kw,
        )
        unlabeled = input_pipeline.create_train_iterator(
            config.data, dataset=config.unlabeled_dataset, split=config.unlabeled_split,
            global_batch_size=b_u, seed=config.seed + 1000 + seed_offset, start_step=start_step,
            source=pseudo, **pipe_kw,
        )
        eye = np.eye(num_classes, dtype=np.float32)
        for lab, unl in zip(labeled, unlabeled, strict=True):
            n_l, n_u = len(lab['label']), len(unl['label'])
            batch = {
                'image': np.concatenate([lab['image'], unl['image']]),
                'label': np.concatenate([lab['label'], unl['targets'].argmax(-1).astype(np.int32)]),
                'targets': np.concatenate([lab.get('targets', eye[lab['label']]), unl['targets']]),
                'weight': np.concatenate([
                    np.full(n_l, 1.0 / b_l, np.float32),
                    np.full(n_u, ns.unlabeled_weight / b_u, np.float32),
                ]),
            }
            if 'valid' in lab:  # undecodable images' stand-ins (input_pipeline) count for nothing
                batch['valid'] = np.concatenate([lab['valid'], unl['valid']])
            yield batch

    return make
