"""How far float32 rounding differences carry in test_one_vs_eight_devices_same_losses.

    python tests/determinism_envelope.py DATA_DIR [TRIALS]

1 and 8 devices sum BatchNorm statistics, the loss and the gradients in different orders,
so their parameters differ by about one float32 rounding after each step; the training
dynamics then amplify that. This script measures the amplification on the test's own
run (configs/default.py, resnet_tiny, batch 16, 28 px, 10 steps, one device): a
reference run, then runs whose parameters get a relative perturbation of +-2^-23 (one
rounding) after every step, and prints each step's largest relative loss difference.
The test's per-step tolerance is 10x this envelope (tests/test_trainer.py).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (the tests' XLA flags, as the test's subprocesses get)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import input_pipeline  # noqa: E402
from trainers import core, loop, supervised  # noqa: E402

data_dir = sys.argv[1]
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 8
input_pipeline.get_dataset_info('mnist5k', data_dir)
from configs import default  # noqa: E402

config = default.get_config()  # exactly the test's CLI overrides
config.data.data_dir = data_dir
for k, v in dict(model='resnet_tiny', num_train_steps=10, batch_size=16, eval_batch_size=16,
                 log_every_steps=1, eval_every_steps=10, checkpoint_every_steps=10, image_size=28).items():
    config[k] = v
setup = supervised.build(config)
model, mesh = setup.model, setup.mesh
state0, sh = core.create_train_state(model, setup.tx, rng=jax.random.key(config.seed),
    input_shape=(1, setup.image_size, setup.image_size, setup.channels), use_ema=False, mesh=mesh)
step = core.jit_train_step(core.make_train_step(model, setup.tx, setup.schedule, config), sh, mesh)
pipe_kw = loop.pipeline_kwargs(setup.image_size, setup.channels, setup.model_cfg)
it = input_pipeline.create_train_iterator(config.data, dataset=config.dataset, split=config.train_split,
    global_batch_size=config.batch_size, seed=config.seed, start_step=0,
    source=supervised.configuration.labeled_source(config), **pipe_kw)
batches = [core.to_global(next(it), core.batch_sharding(mesh)) for _ in range(10)]


def run(noise_seed=None):
    st = jax.tree.map(jnp.copy, state0)
    losses = []
    rng = np.random.default_rng(noise_seed)
    for b in batches:
        st, m = step(st, b)
        losses.append(float(m['loss']))
        if noise_seed is not None:
            st = st.replace(params=jax.tree.map(
                lambda x: x * (1 + 2.0**-23 * jnp.asarray(rng.choice([-1.0, 1.0], x.shape), x.dtype)),
                st.params))
    return np.array(losses)


ref = run()
print(json.dumps({'deterministic': bool((ref == run()).all())}))
rel = []
for t in range(trials):
    rel.append(np.abs(run(t) - ref) / np.abs(ref))
    print(json.dumps({'trial': t, 'rel': [float(f'{v:.2e}') for v in rel[-1]]}), flush=True)
envelope = np.maximum.accumulate(np.array(rel).max(0))
print(json.dumps({'envelope': [float(f'{v:.2e}') for v in envelope], 'ref': ref.tolist()}))
