"""jaxcl.train.methods.swav: unit-norm prototypes, frozen over the first steps; multi-crop; the queue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses, models
from jaxcl.train import devices, methods
from jaxcl.train.methods import base, swav as swav_method
from tests.helpers import load_recipe, randn, step_and_batches, tiny


def _prototypes(state):
  return np.asarray(state.params["prototypes"]["kernel"])  # (E, K): a prototype per column


def test_multi_crop_prototypes_frozen_then_unit_norm(data_dir, monkeypatch):
  """2 large views and 4 small crops (5x5) through a ResNet: the SwAV loss gets the scores
  of 6 views of each example, the codes of views 0 and 1 as targets. The prototypes start unit-norm, stay
  exactly as they were over the frozen first step (no gradient: their optimizer state does not move
  either), then move and stay unit-norm."""
  config = tiny(load_recipe("swav_digits"), data_dir, steps=2, encoder="resnet18")
  config.swav.freeze_prototypes_steps = 1
  config.swav.small_crops, config.swav.small_crop_size, config.swav.small_crop_scale = 4, 5, (0.2, 0.5)
  # A one-block ResNet: the same convolutional code path over two image sizes, compiled in a fraction of
  # ResNet-18's time (ResNet-18 itself: tests/models/test_resnet.py).
  monkeypatch.setattr(base, "build_encoder", lambda config: models.ResNet(
      stage_sizes=(1,), block="basic", width=8, small_image=True))
  assert config.swav.small_crops == 4
  groups = methods.get("swav").view_groups(config, {"crop_scale": (0.5, 1.0)})
  assert [count for count, _ in groups] == [2, 4] and groups[1][1]["output_size"] == 5
  seen = []
  swav = losses.swav
  monkeypatch.setattr(losses, "swav", lambda scores, **kw: seen.append((scores.shape, kw["assign_views"])) or swav(scores, **kw))
  setup, state, step, it, mesh = step_and_batches(config)
  initial = _prototypes(state)
  np.testing.assert_allclose(np.linalg.norm(initial, axis=0), 1.0, rtol=1e-5)
  batch = lambda s: devices.to_global(setup.text.prepare(config, next(it), s), mesh)
  first, metrics = step(state, batch(0))
  assert seen == [((16, 6, config.swav.num_prototypes), (0, 1))]
  assert bool(metrics["finite"]) and float(metrics["loss"]) > 0
  np.testing.assert_array_equal(_prototypes(first), initial)  # step 0 < freeze_prototypes_steps
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(first.opt_state)
             if "prototypes" in jax.tree_util.keystr(path)]
  assert moments and all(not np.any(np.asarray(m)) for m in moments)
  second, _ = step(first, batch(1))
  assert not np.allclose(_prototypes(second), initial)
  np.testing.assert_allclose(np.linalg.norm(_prototypes(second), axis=0), 1.0, rtol=1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("num_prototypes", 1, "`config.swav.num_prototypes` must be >= 2"),
    ("epsilon", 0.0, "`config.swav.epsilon` must be > 0"),
    ("sinkhorn_iterations", 0, "`config.swav.sinkhorn_iterations` must be >= 1"),
    ("freeze_prototypes_steps", -1, "`config.swav.freeze_prototypes_steps` must be >= 0"),
    ("small_crop_size", 0, "`config.swav.small_crop_size` >= 1"),
    ("queue_size", 100, "`config.swav.queue_size` must be 0 or a positive multiple of the batch size 256, got 100"),
    ("queue_start_step", -1, "`config.swav.queue_start_step` must be >= 0"),
])
def test_config_errors_name_the_key(key, value, match):
  config = load_recipe("swav_digits")
  config.swav[key] = value
  with pytest.raises(ValueError, match=match):
    methods.get("swav").check(config)


def test_multi_crop_needs_a_convolutional_encoder_and_no_gradient_cache():
  config = load_recipe("swav_digits")
  config.swav.small_crops = 4
  config.model.encoder = "mlp"
  with pytest.raises(ValueError, match="`config.swav.small_crops` > 0 .* needs a convolutional encoder"):
    methods.get("swav").check(config)
  assert "multi-crop" in methods.get("swav").grad_cache_conflict(config)


def _queue_state(queue, rows, ptr, wait):
  return {"queue": jnp.asarray(queue), "queue_rows": jnp.int32(rows), "queue_ptr": jnp.int32(ptr),
          "queue_wait": jnp.int32(wait)}


def test_queue_scores_join_the_codes_once_the_queue_is_full():
  """`queue_loss_and_state` on 3 views of 4 samples, a queue of 8 rows (E = 5, K = 6): before the queue is
  full the loss is the batch's alone; once full it is `losses.swav` with the queue's scores against the
  prototypes; the batch's normalised views 0 and 1 are written at the pointer, counted up to Q, and not
  written while `queue_wait` > 0 (which counts down)."""
  projection, prototypes, queue = randn(0, 3, 4, 5), randn(1, 5, 6), randn(2, 2, 8, 5)
  scores = randn(3, 4, 3, 6)
  swav = lambda queue_scores=None: losses.swav(scores, temperature=0.1, queue_scores=queue_scores)  # noqa: E731

  loss, state, _ = swav_method.queue_loss_and_state(swav, projection, prototypes, _queue_state(queue, 4, 4, 0))
  np.testing.assert_allclose(float(loss), float(losses.swav(scores, temperature=0.1)), rtol=1e-6)
  normalised = projection[:2] / np.linalg.norm(projection[:2], axis=-1, keepdims=True)
  np.testing.assert_allclose(state["queue"][:, 4:], normalised, rtol=1e-6)
  np.testing.assert_array_equal(state["queue"][:, :4], queue[:, :4])
  assert (int(state["queue_rows"]), int(state["queue_ptr"])) == (8, 0)

  loss, full, _ = swav_method.queue_loss_and_state(swav, projection, prototypes, state)
  queue_scores = np.einsum("aqe,ek->qak", np.asarray(state["queue"], np.float64), prototypes)
  np.testing.assert_allclose(float(loss), float(losses.swav(scores, temperature=0.1, queue_scores=queue_scores)),
                             rtol=1e-5)
  assert float(loss) != pytest.approx(float(losses.swav(scores, temperature=0.1)), rel=1e-3)  # the queue counts
  assert (int(full["queue_rows"]), int(full["queue_ptr"])) == (8, 4)

  _, waiting, _ = swav_method.queue_loss_and_state(swav, projection, prototypes, _queue_state(queue, 0, 0, 2))
  np.testing.assert_array_equal(waiting["queue"], queue)
  assert (int(waiting["queue_rows"]), int(waiting["queue_wait"])) == (0, 1)


def test_queue_fills_from_the_start_step(data_dir):
  """A run of 4 steps, batch 16, a queue of 32 from step 1: the rows written after each step are 0, 16,
  32, 32 (the last step, the queue full, the first with its scores), unit-norm."""
  config = tiny(load_recipe("swav_digits"), data_dir)
  config.swav.queue_size, config.swav.queue_start_step, config.swav.freeze_prototypes_steps = 32, 1, 1
  setup, state, step, it, mesh = step_and_batches(config)
  assert set(state.method_state) == {"queue", "queue_rows", "queue_ptr", "queue_wait"}
  rows = []
  for s in range(4):
    state, metrics = step(state, devices.to_global(setup.text.prepare(config, next(it), s), mesh))
    assert bool(metrics["finite"])
    rows.append(int(state.method_state["queue_rows"]))
  assert rows == [0, 16, 32, 32]
  assert np.all(np.abs(np.linalg.norm(np.asarray(state.method_state["queue"]), axis=-1) - 1) < 1e-5)
