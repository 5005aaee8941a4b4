"""jaxcl.train.methods.swav: unit-norm prototypes, frozen over the first steps."""

import jax
import numpy as np
import pytest

from jaxcl import losses, models
from jaxcl.train import devices, methods
from jaxcl.train.methods import base
from tests.helpers import load_recipe, step_and_batches, tiny


def _prototypes(state):
  return np.asarray(state.params["prototypes"]["kernel"])  # (E, K): a prototype per column


def test_multi_crop_prototypes_frozen_then_unit_norm(data_dir, monkeypatch):
  """2 large views and the recipe's 4 small crops (5x5) through a ResNet: the SwAV loss gets the scores
  of 6 views of each example, the codes of views 0 and 1 as targets. The prototypes start unit-norm, stay
  exactly as they were over the frozen first step (no gradient: their optimizer state does not move
  either), then move and stay unit-norm."""
  config = tiny(load_recipe("swav_digits"), data_dir, steps=2, encoder="resnet18")
  config.swav.freeze_prototypes_steps = 1
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
])
def test_config_errors_name_the_key(key, value, match):
  config = load_recipe("swav_digits")
  config.swav[key] = value
  with pytest.raises(ValueError, match=match):
    methods.get("swav").check(config)


def test_multi_crop_needs_a_convolutional_encoder_and_no_gradient_cache():
  config = load_recipe("swav_digits")
  config.model.encoder = "mlp"
  with pytest.raises(ValueError, match="`config.swav.small_crops` > 0 .* needs a convolutional encoder"):
    methods.get("swav").check(config)
  assert "multi-crop" in methods.get("swav").grad_cache_conflict(load_recipe("swav_digits"))
