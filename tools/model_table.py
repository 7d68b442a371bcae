"""Parameters, MACs and published accuracy of registered models, as a Markdown table.

    python tools/model_table.py                   # every model
    python tools/model_table.py 'resnet*' lenet5  # some
    python tools/model_table.py --update-readme   # rewrite the table in README.md

Parameters come from `jax.eval_shape` (no memory, no compilation). MACs are counted
exactly from the forward pass's jaxpr at the model's default resolution, batch 1: for
every convolution, output elements x kernel taps x input channels per group; for every
matrix product, output elements x contracted size. Elementwise work (norms, activations,
pooling) is not counted, which is the convention of the published MAC figures.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

import models  # noqa: E402
from models import layers  # noqa: E402

# Where the executed MACs differ from the architecture's own count, say so under the table.
NOTES = {
    'lenet5': 'LeNet-5 runs C3 as one convolution over a kernel with zeros where Table I has '
    'no connection, so the executed count includes 90,000 zero taps; the paper\'s network '
    'does 326,520 MACs (340,908 "connections" with biases and subsampling).',
}

README_START = '<!-- model-table:start -->'
README_END = '<!-- model-table:end -->'


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, jex_core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jex_core.Jaxpr):
                yield x


def count_macs(jaxpr) -> int:
    """Multiply-accumulates of convolutions and matrix products in `jaxpr` (recursive)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'conv_general_dilated':
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params['dimension_numbers']
            kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            in_per_group = rhs[dn.rhs_spec[1]]
            total += math.prod(out) * kernel_spatial * in_per_group
        elif name == 'dot_general':
            (lhs_contract, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        for sub in _sub_jaxprs(eqn):
            total += count_macs(sub)
    return total


def model_stats(name: str) -> dict:
    cfg = models.get_model_cfg(name)
    model = models.create_model(name)
    shape = (1, *cfg.input_size)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    params = sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))
    # The architecture's own convolutions, whatever formulation runs on this backend.
    with layers.native_convolutions():
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return {
        'model': name,
        'params': params,
        'macs': count_macs(jaxpr.jaxpr),
        'resolution': cfg.input_size[0],
        'top1': cfg.top1,
        'paper': cfg.paper,
    }


def _si(n: int) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if n >= scale:
            return f'{n / scale:.3g} {unit}'
    return str(n)


def _short_cite(paper: str) -> str:
    """'He et al., "Deep Residual ...", CVPR 2016' -> 'He et al. CVPR 2016'."""
    if not paper:
        return ''
    authors = paper.split(',')[0]
    if paper.count(',') > 2 and 'et al' not in authors:
        authors += ' et al.'
    year = re.findall(r'(?:19|20)\d\d', paper)
    venue = paper.rsplit('",', 1)[-1].strip() if '",' in paper else ''
    return f'{authors} {venue or (year[-1] if year else "")}'.strip()


def markdown(rows: list[dict]) -> str:
    lines = [
        '| model | params | MACs | input | ImageNet top-1 (published) | reference |',
        '|---|---:|---:|---:|---:|---|',
    ]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r['top1'] is not None else '–'
        lines.append(
            f"| `{r['model']}` | {r['params']:,} | {_si(r['macs'])} | "
            f"{r['resolution']} | {top1} | {_short_cite(r['paper'])} |"
        )
    notes = [f"`{r['model']}`: {NOTES[r['model']]}" for r in rows if r['model'] in NOTES]
    return '\n'.join(lines + ([''] + notes if notes else []))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def update_readme(table: str, path: str) -> None:
    text = open(path).read()
    pattern = re.compile(re.escape(README_START) + '.*?' + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f'{path} has no {README_START} ... {README_END} block to replace.')
    text = pattern.sub(lambda _: f'{README_START}\n{table}\n{README_END}', text)
    with open(path, 'w') as f:
        f.write(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('patterns', nargs='*', default=['*'], help="fnmatch patterns, e.g. 'resnet*'")
    parser.add_argument('--update-readme', action='store_true', help='rewrite the table in README.md')
    parser.add_argument('--include-test-models', action='store_true', help='also list *_tiny models')
    args = parser.parse_args(argv)
    names = sorted({n for p in args.patterns for n in models.list_models(p)}, key=_natural)
    if not args.include_test_models:
        names = [n for n in names if not fnmatch.fnmatch(n, '*_tiny')]
    if not names:
        raise SystemExit(f'No registered model matches {args.patterns}; see models.list_models().')
    table = markdown([model_stats(n) for n in names])
    print(table)
    if args.update_readme:
        update_readme(table, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md'))


if __name__ == '__main__':
    main()
