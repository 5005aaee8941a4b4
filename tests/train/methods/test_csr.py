"""CSR in the training system (jaxcl.train.methods.csr): the sparse autoencoder on a frozen backbone, its
dead-latent counters carried step to step in the method state and restored on a resume, the backbone
restored from an earlier run."""

import json

import jax
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.train import loop, methods, validation
from jaxcl.train import state as state_lib
from tests.helpers import final_state, load_recipe, tiny

K, HIDDEN, MULTI_K, AUX_K, DEAD = 2, 64, 2, 8, 2


def _config(data_dir, steps=3):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=steps)
  config.method, config.loss.name, config.log_every = "csr", "csr", 1
  c = config.csr
  c.hidden, c.k, c.multi_k, c.aux_k, c.dead_threshold = HIDDEN, K, MULTI_K, AUX_K, DEAD
  return config


def _fired(x, positive, p):
  """Which latents are among some row's top MULTI_K·K with a code > 1e-5 (NumPy, float64)."""
  rows = np.concatenate([x, positive]).astype(np.float64)
  pre = (rows - p["pre_bias"]) @ p["encoder"] + p["latent_bias"]
  kth = np.sort(pre, axis=1)[:, -MULTI_K * K][:, None]
  return np.any((pre >= kth) & (pre > 1e-5), axis=0)


def test_counters_carry_and_resume_the_backbone_stays_frozen_and_restores(data_dir, tmp_path, monkeypatch):
  config = _config(data_dir)
  method = methods.get("csr")
  loss, records = method.loss, []

  def recording_loss(config, outputs, batch, state, **kwargs):
    value, new_state, extras = loss(config, outputs, batch, state, **kwargs)
    jax.debug.callback(lambda *a: records.append(jax.tree.map(np.asarray, a)), outputs["projection"],
                       kwargs["params"]["autoencoder"], state["steps_since_active"], new_state["steps_since_active"])
    return value, new_state, extras

  monkeypatch.setattr(method, "loss", recording_loss)
  workdir = tmp_path / "run"
  assert loop.train_and_evaluate(config, str(workdir), progress=False, stop_at=2) == {"step": 2, "stopped": True}
  assert loop.train_and_evaluate(config, str(workdir), progress=False) == {"step": 3}  # resumed at step 2
  logged = [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
  assert len(records) == len(logged) == 3

  zeros = np.zeros(HIDDEN, np.int32)
  for t, ((x, params, before, after), value) in enumerate(zip(records, logged)):
    np.testing.assert_array_equal(before, zeros if t == 0 else records[t - 1][3])  # carried, and restored at t = 2
    fired = _fired(x[0], x[1], params)
    np.testing.assert_array_equal(after, np.where(fired, 0, before + 1))  # reset when fired, +1 otherwise
    assert 0 < fired.sum() < HIDDEN
    want = losses.csr(x[0], params, k=K, positive=x[1], steps_since_active=before, dead_threshold=DEAD,
                      multi_k=MULTI_K, multi_k_weight=0.125, aux_k=AUX_K, aux_weight=1 / 32,
                      contrastive_weight=0.1, temperature=0.2)
    np.testing.assert_allclose(value, float(want.loss), rtol=1e-5)
  assert records[1][3].max() >= 2  # idle for two steps before the resume: a restart at zeros would show

  final = final_state(config, str(workdir), 3)
  np.testing.assert_array_equal(final.method_state["steps_since_active"], records[2][3])
  setup = state_lib.build_setup(config)
  initial = jax.jit(lambda key: state_lib.init_state(config, setup, key))(jax.random.key(config.seed))
  for a, b in zip(jax.tree.leaves(final.params["encoder"]), jax.tree.leaves(initial.params["encoder"])):
    np.testing.assert_array_equal(a, b)  # frozen (weight decay included): the initial backbone
  assert not np.array_equal(final.params["autoencoder"]["encoder"], records[0][1]["encoder"])

  # A fresh run on that run's backbone gets its encoder (here in place of zeros), and keeps its own autoencoder.
  other = _config(data_dir)
  other.csr.backbone = str(workdir)
  validation.validate_config(other, data=False)
  fresh = final.replace(params={**final.params, "encoder": jax.tree.map(jax.numpy.zeros_like, final.params["encoder"]),
                                "autoencoder": records[0][1]})
  restored = method.init_state_from_data(other, None, fresh, (), None)
  for a, b in zip(jax.tree.leaves(restored.params["encoder"]), jax.tree.leaves(final.params["encoder"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(restored.params["autoencoder"]), jax.tree.leaves(records[0][1])):
    np.testing.assert_array_equal(a, b)


def test_csr_config_checks(tmp_path):
  config = load_recipe("simclr_digits")
  config.method, config.loss.name = "csr", "csr"
  validation.validate_config(config, data=False)
  assert (config.csr.k, config.csr.dead_threshold, config.csr.hidden, config.csr.backbone) == (8, 10, 0, "")
  config.csr.k = 0
  with pytest.raises(ValueError, match=r"`config.csr.k` must be >= 1, got 0"):
    validation.validate_config(config, data=False)
  config.csr.k, config.csr.backbone = 8, str(tmp_path)
  with pytest.raises(ValueError, match=r"`config.csr.backbone` names .*which has not finished"):
    validation.validate_config(config, data=False)
