"""The image-text methods' losses with state of their own (jaxcl.train.methods.image_text): bimodal
iSogCLR's per-pair temperatures, CE-CLIP's adaptive thresholds, GRAM's matching head and draw counter
(issue 15 item 6).

Each check is one jitted train step of the tiny clip recipe on the 8-device mesh of the tests, against a
direct call of the loss on the embeddings the step computes (the model applied to the step's augmented
images and tokens)."""

import functools

import jax
import jax.numpy as jnp
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
from tests.models.reference import np_match_head


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


def _np_matching_loss(head_params, text, image, negatives):
  """GRAM's DAM term in float64: the 2-way cross-entropy over (t_i, x_i) → 1, (t_i, x_data[i]) → 0,
  (t_anchor[j], x_j) → 0; and its gradient in the head's output bias, mean(softmax − one-hot)."""
  t, x = np.asarray(text, np.float64), np.asarray(image, np.float64)
  data, anchor = np.asarray(negatives.data), np.asarray(negatives.anchor)
  logits = np_match_head(head_params, np.concatenate([t, t, t[anchor]]), np.concatenate([x, x[data], x]))
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  labels = np.r_[np.ones(len(t), int), np.zeros(2 * len(t), int)]
  return -np.mean(log_p[np.arange(len(labels)), labels]), np.mean(np.exp(log_p) - np.eye(2)[labels], axis=0)


def test_gram_step_is_the_volume_contrast_plus_the_matching_term(data_dir):
  config = _config(data_dir, "gram")
  setup, _, state, new, metrics, batch, _, _ = _first_step(config)
  assert bool(metrics["finite"])
  assert int(state.method_state["draws"]) == 0 and int(new.method_state["draws"]) == 1
  assert new.method_state["draws"].sharding.spec == P()
  head = state.params["match_head"]
  assert head["dense0"]["kernel"].shape == (3 * 16, 3 * 16)  # head_hidden 0: its input's size, [t; i; t ⊙ i]

  # The step (8 devices, the batch split: volumes on allgather, the negatives' rows gathered by GSPMD) is
  # gram + 1.0 · DAM of the step's embeddings, τ = 1 / the learned logit scale, the negatives drawn
  # unsharded with the documented key, the head in float64 NumPy. The head's parameters get the DAM
  # term's gradient through the method's loss (the step's first update is 0 by the warmup). dam_weight = 0:
  # no head, no state, the volume contrast alone (here with a fixed τ in place of the learned one).
  method = methods.get("clip")
  without = config.copy_and_resolve_references()
  without.gram.dam_weight, without.gram.temperature = 0.0, 0.05
  assert image_text.gram_match_head(without) is None and method.build_model(without, setup.text).match_head is None
  assert method.init_state(without, {}, None, 0) == {}
  out = _step_embeddings(config, setup, state, batch)
  emb = {k: out[k] for k in ("text", "image", "logit_scale")}
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), image_text.GRAM_NEGATIVES_STREAM), 0)

  def direct(emb, head):
    t, x, tau = emb["text"], emb["image"], 1.0 / emb["logit_scale"]
    head_loss = lambda p: method.loss(config, emb, batch, state.method_state, params={"match_head": p})[0]  # noqa: E731
    return dict(volume=losses.gram(t, x, temperature=tau, label_smoothing=0.1, impl="dense"),
                negatives=losses.gram_negatives(t, x, key=key, temperature=tau, impl="dense"),
                head_grads=jax.grad(head_loss)(head),
                fixed_tau=losses.gram(t, x, temperature=0.05, impl="dense"),
                without=method.loss(without, emb, batch, {}, params={})[:2])

  got = jax.jit(direct)(emb, head)
  dam, bias_grad = _np_matching_loss(head, out["text"], out["image"], got["negatives"])
  assert 0.3 < dam < 3.0
  np.testing.assert_allclose(float(metrics["loss"]), float(got["volume"]) + dam, rtol=1e-4)
  assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(got["head_grads"]))
  np.testing.assert_allclose(np.asarray(got["head_grads"]["dense1"]["bias"]), bias_grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(got["without"][0]), float(got["fixed_tau"]), rtol=1e-5)
  assert got["without"][1] == {}


def test_gram_is_clip_only_and_its_section_is_checked():
  config = load_recipe("clip_digits")
  config.loss.name = "gram"
  validation.validate_config(config, data=False)
  assert config.gram.to_dict() == {"temperature": 0.0, "label_smoothing": 0.1, "dam_weight": 1.0, "head_hidden": 0}
  for key, bad, expected in (("temperature", -0.1, "a finite number >= 0"), ("label_smoothing", 1.0, r"in \[0, 1\)"),
                             ("dam_weight", -1.0, "a finite number >= 0"), ("head_hidden", -1, ">= 0")):
    good, config.gram[key] = config.gram[key], bad
    with pytest.raises(ValueError, match=rf"^`config.gram.{key}` must be {expected}.*, got {bad}\.$"):
      validation.validate_config(config, data=False)
    config.gram[key] = good
  config.loss.impl = "blockwise"
  with pytest.raises(ValueError, match=r"^`config.loss.impl` must be one of \('auto', 'dense', 'allgather', 'ring'\) "
                                       r"for `gram`.*got 'blockwise'\.$"):
    validation.validate_config(config, data=False)
  config.loss.impl, config.method = "auto", "siglip"
  with pytest.raises(ValueError, match=r"got 'gram', which works with the methods \('clip',\)"):
    validation.validate_config(config, data=False)
