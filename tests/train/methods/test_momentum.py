"""jaxcl.train.methods.momentum (MoCo, BYOL): the EMA target network. (The method state resumed bit
for bit: tests/train/test_loop.py::test_resume_gives_identical_parameters.)"""

import jax
import numpy as np

from jaxcl.train import devices
from tests.helpers import load_recipe, step_and_batches, tiny


def test_target_network_moves_once_per_optimizer_update_under_accumulation(data_dir):
  config = tiny(load_recipe("byol_digits"), data_dir, steps=4)
  config.grad_accum_steps = 2
  setup, state, step, it, mesh = step_and_batches(config)
  unchanged = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  first, _ = step(state, devices.to_global(setup.text.prepare(config, next(it), 0), mesh))
  # micro-step 1 of 2: no optimizer update, so neither the online nor the EMA target network moves
  assert unchanged(first.params, state.params) and unchanged(first.method_state["target"]["params"], state.method_state["target"]["params"])
  second, _ = step(first, devices.to_global(setup.text.prepare(config, next(it), 1), mesh))
  assert not unchanged(second.params, first.params)
  want = jax.tree.map(lambda t, o: config.momentum.ema * t + (1 - config.momentum.ema) * o,
                      first.method_state["target"]["params"], second.params)
  for got, w in zip(jax.tree.leaves(second.method_state["target"]["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-6, atol=1e-7)
