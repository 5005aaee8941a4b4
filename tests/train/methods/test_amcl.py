"""AMCL in the training system (jaxcl.train.methods.amcl): H projection heads and the temperature network
as trained parameters, the loss `losses.amcl` of the heads' embeddings at the network's temperatures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses, models
from jaxcl.data import pipeline
from jaxcl.train import devices, methods, validation
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from tests.helpers import load_recipe, tiny


def _config(data_dir):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=1)
  config.method, config.loss.name = "amcl", "amcl"
  config.amcl.num_heads, config.amcl.hidden_dim, config.amcl.top_k = 2, 8, 5
  config.amcl.beta, config.amcl.tau_min, config.amcl.tau_max = 0.01, 0.05, 1.0
  config.weight_decay = 0.0  # a parameter moves only by its gradient
  return config


def test_train_step_loss_is_amcl_of_the_heads_at_the_networks_temperatures(data_dir, monkeypatch):
  config = _config(data_dir)
  infos = validation.validate_config(config)
  mesh = devices.make_mesh(config)  # 8 devices: GSPMD partitions the dense loss
  setup = state_lib.build_setup(config, infos["train"], mesh)
  _, shardings = state_lib.state_shardings(config, setup, mesh)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup), out_shardings=shardings)(jax.random.key(0))
  assert {"head0", "head1", "temperature"} <= set(state.params)
  seen = {}  # the step's head embeddings, seen by the method's loss
  method = methods.get("amcl")
  loss = method.loss

  def recording_loss(config, outputs, *args, **kwargs):
    jax.debug.callback(lambda z: seen.update(z=np.asarray(z)), outputs["projection"])
    return loss(config, outputs, *args, **kwargs)

  monkeypatch.setattr(method, "loss", recording_loss)
  batch = next(iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0)))
  step = jax.jit(functools.partial(step_lib.train_step, config, setup), out_shardings=(shardings, None))
  new, metrics = step(state, devices.to_global(setup.text.prepare(config, batch, 0), mesh))
  assert bool(metrics["finite"])

  z = jnp.asarray(seen["z"]).reshape(2, 16, 2, 16)  # (V, B, H, E): 2 heads of 16 side by side
  a = config.amcl
  net = models.AMCLTemperature(hidden_dim=8, tau_min=a.tau_min, tau_max=a.tau_max)
  tau = net.apply({"params": jax.device_get(state.params["temperature"])}, z[0], z[1])
  want = losses.amcl(z[0], z[1], tau, beta=a.beta, top_k=a.top_k)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
  # The temperature network is trained: its parameters got a gradient (no weight decay) and moved.
  for old, updated in zip(jax.tree.leaves(state.params["temperature"]), jax.tree.leaves(new.params["temperature"])):
    assert not np.array_equal(np.asarray(old), np.asarray(updated))


def test_amcl_config_checks():
  config = load_recipe("simclr_digits")
  config.method, config.loss.name = "amcl", "amcl"
  validation.validate_config(config, data=False)
  assert config.amcl.to_dict() == {"num_heads": 3, "beta": 1e-4, "top_k": 100, "tau_min": 1e-5, "tau_max": 2.0,
                                   "hidden_dim": 128}
  config.loss.impl = "ring"
  with pytest.raises(ValueError, match=r"`config.loss.impl='ring'` \(a sharded engine\) works with the losses "
                                       r".*not 'amcl'"):
    validation.validate_config(config, data=False)
  config.loss.impl = "dense"
  with pytest.raises(ValueError, match=r"`config.loss.impl` must be 'auto' for the loss 'amcl'"):
    validation.validate_config(config, data=False)
  config.loss.impl, config.amcl.tau_min = "auto", 3.0
  with pytest.raises(ValueError, match=r"`config.amcl.tau_min` and `config.amcl.tau_max` must satisfy "
                                       r"0 < tau_min < tau_max"):
    validation.validate_config(config, data=False)
