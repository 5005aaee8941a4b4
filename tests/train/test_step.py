"""jaxcl.train.step under gradient caching (`config.grad_cache_chunks`, with `jaxcl.grad_cache`): the
chunked run follows the unchunked one step for step, BatchNorm's running statistics, and the config
errors. (Resume under caching: tests/train/test_loop.py::test_resume_gives_identical_parameters.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.train import devices, loop
from tests.helpers import load_recipe, step_and_batches, tiny


def _steps_of(config, n):
  """(states after each of n train steps, their metrics) from the same init and batches."""
  setup, state, step, it, mesh = step_and_batches(config)
  states, metrics = [], []
  for i in range(n):
    state, m = step(state, devices.to_global(setup.text.prepare(config, next(it), i), mesh))
    states.append(state)
    metrics.append(m)
  return states, metrics


@pytest.mark.parametrize("recipe, chunks, unroll", [("clip_digits", 4, False), ("simclr_digits", 2, True)])
def test_grad_cache_follows_the_unchunked_run_step_for_step(recipe, chunks, unroll, data_dir):
  """`config.grad_cache_chunks` = 4 for CLIP (batch 32 over the 8 test devices: 4 chunks of 1 row per
  device), 2 for SimCLR with the chunk loops unrolled (`config.grad_cache_unroll`), layer norms only: the same loss, gradient norm and parameters as the unchunked run at each of 3
  steps, to float32 rounding; the logit scale (CLIP) is learned the same way. SGD: its update is linear
  in the gradient (Adam's normalisation turns the rounding noise of a near-zero gradient into a full
  step)."""
  runs = []
  for k in (1, chunks):
    config = tiny(load_recipe(recipe), data_dir, steps=3)
    config.batch_size, config.model.norm, config.grad_cache_chunks = 32, "layer", k
    config.optimizer, config.learning_rate, config.grad_cache_unroll = "sgd", 0.5, unroll
    runs.append(_steps_of(config, 3))
  (states, metrics), (cached_states, cached_metrics) = runs
  for s, c, m, cm in zip(states, cached_states, metrics, cached_metrics):
    np.testing.assert_allclose(cm["loss"], m["loss"], rtol=1e-5)
    np.testing.assert_allclose(cm["grad_norm"], m["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(c.params), jax.tree.leaves(s.params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert float(metrics[-1]["loss"]) != float(metrics[0]["loss"])  # it trained


def test_grad_cache_with_batch_norm_keeps_the_running_mean_of_the_whole_batch(data_dir):
  """BatchNorm under gradient caching normalises each chunk by its own statistics; the running mean
  after a step is the whole batch's (the average of equal chunks' means), the running variance is
  not (the within-chunk variances miss the between-chunk part: smaller)."""
  stats = []
  for chunks in (1, 2):
    config = tiny(load_recipe("simclr_digits"), data_dir, steps=1)
    config.batch_size, config.model.norm, config.grad_cache_chunks = 32, "batch", chunks
    (state,), _ = _steps_of(config, 1)
    stats.append(jax.tree_util.tree_flatten_with_path(state.batch_stats)[0])
  for (path, whole), (_, chunked) in zip(*stats, strict=True):
    name = jax.tree_util.keystr(path)
    if name.endswith("['mean']"):
      np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-6)
    else:
      assert name.endswith("['var']") and float(jnp.mean(chunked)) < float(jnp.mean(whole))


def test_grad_cache_config_errors_name_the_key(data_dir, tmp_path):
  config = tiny(load_recipe("clip_digits"), data_dir)
  config.grad_cache_chunks = 4  # batch 16 over 8 devices: 2 per device
  with pytest.raises(ValueError, match=r"^`config.grad_cache_chunks` = 4 must divide each device's batch: "
                                       r"`config.batch_size` 16 over 8 devices is 2\.$"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config = tiny(load_recipe("byol_digits"), data_dir)
  config.grad_cache_chunks = 2
  with pytest.raises(ValueError, match=r"`config.grad_cache_chunks` = 2 does not support method 'byol' .*"
                                       r"\(an EMA target network\): set it to 1\."):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config.grad_cache_chunks = 0
  with pytest.raises(ValueError, match=r"`config.grad_cache_chunks` must be a positive integer, got 0"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
