"""The image-text methods' losses with state of their own (jaxcl.train.methods.image_text): bimodal
iSogCLR's per-pair temperatures and CE-CLIP's adaptive thresholds (issue 15 item 6).

Each check is one jitted train step of the tiny clip recipe on the 8-device mesh of the tests, against a
direct call of the loss on the embeddings the step computes (the model applied to the step's augmented
images and tokens)."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcl import losses
from jaxcl.data import augment, pipeline, sources
from jaxcl.train import checkpoints, devices, methods, validation
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from jaxcl.train.methods import base, image_text
from tests.helpers import load_recipe, tiny


def _config(data_dir, loss_name):
  config = tiny(load_recipe("clip_digits"), data_dir, steps=2)
  config.loss.name = loss_name
  return config


def _first_step(config):
  """(setup, shardings, initial state, state after one step, its metrics, the step's global batch, the
  host batch, the loader), built as the loop builds them."""
  infos = validation.validate_config(config)
  mesh = devices.make_mesh(config)
  setup = state_lib.build_setup(config, infos["train"], mesh)
  _, shardings = state_lib.state_shardings(config, setup, mesh)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup), out_shardings=shardings)(
      jax.random.key(0))
  step = jax.jit(functools.partial(step_lib.train_step, config, setup), out_shardings=(shardings, None))
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=config.batch_size, seed=0))
  host = next(it)
  batch = devices.to_global(setup.text.prepare(config, host, 0), mesh)
  new, metrics = step(state, batch)
  return setup, shardings, state, new, metrics, batch, host, it


def _step_embeddings(config, setup, state, batch) -> dict:
  """The model's outputs in the first train step: its augmented images (the step's per-example keys)
  and the batch's tokens (with CE-CLIP, (B, 1 + H, L): captions and hard negatives), with the initial
  variables."""
  b = batch["image"].shape[0]
  keys = augment.example_keys(jax.random.fold_in(jax.random.key(config.seed), 0), b, None)
  images = augment.augment_examples(keys, devices.decode_images(batch["image"], setup.info.image_shape), setup.aug)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out, _ = jax.jit(lambda v, x, t: setup.model.apply(v, x, t, train=True, mutable=["batch_stats"]))(
      variables, images, batch["text"])
  return out


def test_isogclr_clip_is_clip_only_and_its_section_is_checked():
  config = load_recipe("clip_digits")
  config.loss.name = "isogclr_clip"
  validation.validate_config(config, data=False)
  config.isogclr_clip.tau_max = 0.001
  with pytest.raises(ValueError, match=r"^`config.isogclr_clip.tau_max` must be >= `config.isogclr_clip.tau_min` "
                                       r"\(0.005\), got 0.001\.$"):
    validation.validate_config(config, data=False)
  config.isogclr_clip.tau_max, config.method = 0.05, "siglip"
  with pytest.raises(ValueError, match=r"got 'isogclr_clip', which works with the methods \('clip',\)"):
    validation.validate_config(config, data=False)
  config.method, config.grad_cache_chunks = "clip", 2
  with pytest.raises(ValueError, match="per-example loss state"):
    validation.validate_config(config, data=False)


def test_isogclr_clip_step_is_the_loss_and_writes_the_batch_state_only(data_dir, tmp_path):
  config = _config(data_dir, "isogclr_clip")
  setup, shardings, state, new, metrics, batch, host, it = _first_step(config)
  assert bool(metrics["finite"])
  assert isinstance(new.method_state, losses.IsogclrClipState)
  n = new.method_state.image_tau.shape[0]
  for arr in new.method_state:  # (1800,) split in 8 shards of 225 along the batch mesh axes
    assert arr.shape == (1800,) and arr.sharding.spec == P(devices.BATCH_AXES)
    assert {s.data.shape for s in arr.addressable_shards} == {(225,)}

  # The step's loss and state are the loss's on the step's embeddings, with its own (LibAUC GCLoss_v2)
  # defaults = config.isogclr_clip's, computed unsharded on the dense engine (the step: sharded, allgather).
  out = _step_embeddings(config, setup, state, batch)
  want = losses.isogclr_clip(out["image"], out["text"], host["index"], losses.isogclr_clip_state(n), impl="dense")
  np.testing.assert_allclose(float(metrics["loss"]), float(want.loss), rtol=1e-4)
  got = image_text.loss_isogclr_clip_state(new.method_state)
  for name, g, w in zip(got._fields, got, want.state):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)

  # Written where the batch's ids are and nowhere else; never-seen pairs stored finite.
  ids = np.asarray(host["index"])
  others = np.setdiff1d(np.arange(n), ids)
  stored = new.method_state
  for tau in (stored.image_tau, stored.text_tau):
    tau = np.asarray(tau)
    assert np.all(tau[ids] != np.float32(0.01)) and np.all(tau[others] == np.float32(0.01))
    assert np.all((tau >= 0.005) & (tau <= 0.05))
  for log_u in (stored.image_log_u, stored.text_log_u):
    log_u = np.asarray(log_u)
    assert np.all(np.isfinite(log_u))
    assert np.all(log_u[ids] > -1e5) and np.all(log_u[others] == base.UNSEEN_LOG_U)

  # A checkpoint of that state is restored as it was (the loop's restore refuses non-finite states).
  manager = checkpoints.checkpoint_manager(config, str(tmp_path))
  checkpoints.save_checkpoint(manager, 1, new, it)
  abstract, _ = state_lib.state_shardings(config, setup, setup.mesh)
  restored, step = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  assert step == 1 and isinstance(restored.method_state, losses.IsogclrClipState)
  for a, b in zip(restored.method_state, new.method_state):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.spec == P(devices.BATCH_AXES)


def test_ce_clip_section_is_checked(data_dir):
  config = load_recipe("clip_digits")
  config.data.data_dir = data_dir
  config.loss.name = "ce_clip"
  validation.validate_config(config, data=False)
  config.ce_clip.threshold_max = -1.0
  with pytest.raises(ValueError, match=r"^`config.ce_clip.threshold_max` must be >= `config.ce_clip.threshold_min` "
                                       r"\(0.0\), got -1.0\.$"):
    validation.validate_config(config, data=False)
  config.ce_clip.threshold_max, config.ce_clip.num_hard_negatives = 10.0, 10  # the digits have 9 other classes
  with pytest.raises(ValueError, match=r"^`config.ce_clip.num_hard_negatives` must be in \[1, 9\].*got 10\.$"):
    methods.get("clip").text_side(config, sources.build_source(config.data, "train")[1])


def test_ce_clip_step_is_the_loss_with_hard_negative_captions_and_moves_the_thresholds(data_dir):
  config = _config(data_dir, "ce_clip")
  setup, shardings, state, new, metrics, batch, host, _ = _first_step(config)
  assert bool(metrics["finite"])
  tokens, valid = np.asarray(batch["text"]), np.asarray(batch["hard_negative_valid"])
  assert tokens.shape == (16, 4, config.model.text_max_len) and valid.shape == (16, 3) and valid.all()
  # Each hard negative is its caption with another digit's name: one word differs, none is the caption.
  differing = (tokens[:, 1:] != tokens[:, :1]).sum(axis=-1)
  assert np.all(differing == 1)

  thresholds = np.asarray(new.method_state["thresholds"])
  assert np.all(np.asarray(state.method_state["thresholds"]) == 0)  # θ starts at 0
  assert new.method_state["thresholds"].sharding.spec == P()
  assert np.any(thresholds > 0) and np.all((thresholds >= 0.0) & (thresholds <= 10.0))
  # The step's loss and θ are the loss's on the step's embeddings, with its own defaults (the released
  # run's weights and clamp) = config.ce_clip's, unsharded on the dense engine (the step: allgather).
  out = _step_embeddings(config, setup, state, batch)
  want = losses.ce_clip(out["image"], out["text"], out["hard_negatives"], logit_scale=out["logit_scale"],
                        valid=valid, impl="dense")
  np.testing.assert_allclose(float(metrics["loss"]), float(want.loss), rtol=1e-4)
  np.testing.assert_allclose(thresholds, np.asarray(want.thresholds), rtol=1e-4, atol=1e-5)
