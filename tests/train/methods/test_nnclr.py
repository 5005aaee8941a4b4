"""jaxcl.train.methods.nnclr: the support set in the method state, filled first in, first out."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.train import devices, methods
from tests.helpers import load_recipe, step_and_batches, tiny


def test_fifo_enqueue_writes_over_the_oldest_rows_and_wraps_the_pointer():
  queue = jnp.zeros((6, 2))
  queue, ptr = methods.fifo_enqueue(queue, jnp.int32(4), jnp.ones((2, 2)))
  assert int(ptr) == 0
  np.testing.assert_array_equal(np.asarray(queue[:, 0]), [0, 0, 0, 0, 1, 1])
  queue, ptr = methods.fifo_enqueue(queue, ptr, 2 * jnp.ones((2, 2)))
  np.testing.assert_array_equal(np.asarray(queue[:, 0]), [2, 2, 0, 0, 1, 1])
  assert int(ptr) == 2


def test_each_step_writes_its_view_1_projections_into_the_support_set(data_dir):
  config = tiny(load_recipe("nnclr_digits"), data_dir, steps=2)
  config.nnclr.support_size = 48  # 3 batches of 16
  setup, state, step, it, mesh = step_and_batches(config)
  before = np.asarray(state.method_state["support"])
  np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, rtol=1e-5)  # random unit vectors
  after, metrics = step(state, devices.to_global(setup.text.prepare(config, next(it), 0), mesh))
  assert bool(metrics["finite"])
  support = np.asarray(after.method_state["support"])
  assert int(after.method_state["support_ptr"]) == 16
  np.testing.assert_array_equal(support[16:], before[16:])  # only the oldest 16 rows were replaced
  assert not np.any(np.all(support[:16] == before[:16], axis=1))
  np.testing.assert_allclose(np.linalg.norm(support[:16], axis=1), 1.0, rtol=1e-5)


def test_support_size_must_be_a_multiple_of_the_batch():
  config = load_recipe("nnclr_digits")
  config.nnclr.support_size = 1000
  with pytest.raises(ValueError, match="`config.nnclr.support_size` must be a positive multiple of the batch size 256"):
    methods.get("nnclr").check(config)
