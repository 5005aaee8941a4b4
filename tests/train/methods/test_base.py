"""Methods as plug-ins (`jaxcl.train.methods.base`): the registry, the methods' config sections, a
method defined outside the package trained by the one loop, and the loss engine options a method's loss
gets (the single-device, sharded and pallas engines).
(The method state resumed bit for bit: tests/train/test_loop.py::test_resume_gives_identical_parameters.)"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.ops import pallas
from jaxcl.train import loop, methods, validation
from jaxcl.train.config import base_config
from tests.helpers import final_state, load_recipe, tiny


BUILT_IN = ("simclr", "dcl", "supcon", "multiview", "moco", "byol", "nnclr", "simsiam", "swav", "clip", "siglip", "lit",
            "amcl", "csr", "simcse")


def test_every_built_in_method_is_registered_under_its_name():
  assert methods.names()[:len(BUILT_IN)] == BUILT_IN
  for name in BUILT_IN:
    assert methods.get(name).name == name
  assert [n for n in BUILT_IN if methods.get(n).image_text] == ["clip", "siglip", "lit"]
  assert [n for n in BUILT_IN if methods.get(n).text_only] == ["simcse"]
  with pytest.raises(ValueError, match=r"`config.method` must be one of \('simclr', .*'lit'.*\), got 'simclr2'"):
    methods.get("simclr2")
  with pytest.raises(ValueError, match="a method needs a name"):
    methods.register(methods.Method())


def test_method_config_sections_are_in_the_base_config_and_checked():
  config = base_config()
  assert config.momentum.to_dict() == {"ema": 0.99, "queue_size": 0}  # moco and byol
  assert set(config.isogclr) == {"tau_init", "gamma", "rho", "eta", "beta", "tau_min", "tau_max"}  # simclr
  assert methods.section_owners("momentum") == ("moco", "byol") and methods.section_owners("mcl") == ("simclr",)
  config.method, config.loss.name, config.model.predictor_dim = "byol", "negative_cosine", 16
  config.momentum.ema = 0.9  # its own section
  validation.validate_config(config, data=False)
  config.momentum.queue_size = 256
  with pytest.raises(ValueError, match=r"`config.momentum.queue_size` is MoCo's queue of negatives"):
    validation.validate_config(config, data=False)
  config.method, config.loss.name, config.momentum.queue_size = "moco", "infonce", 300
  with pytest.raises(ValueError, match=r"`config.momentum.queue_size` must be 0 or a positive multiple of the "
                                       r"batch size 256, got 300"):
    validation.validate_config(config, data=False)
  with config.unlocked():
    config.momentum.queuesize = 256
  with pytest.raises(ValueError, match=r"Unknown config key `config.momentum.queuesize` \(did you mean "
                                       r"`config.momentum.queue_size`\?\)"):
    validation.validate_config(config, data=False)

  class Conflicting(methods.ViewsMethod):
    name = "test_conflicting"

    def config_sections(self):
      return {"momentum": ml_collections.ConfigDict({"ema": 0.5, "queue_size": 0})}

  methods.register(Conflicting())
  try:
    with pytest.raises(ValueError, match=r"methods 'moco' and 'test_conflicting' both declare `config.momentum`"):
      base_config()
  finally:
    methods.unregister("test_conflicting")


class CountingBarlowTwins(methods.ViewsMethod):
  """A method written outside the package: Barlow Twins on two views, with a config section and a state
  of its own (how many optimizer updates it has seen, counted by `after_update`)."""

  name = "test_barlow_twins"
  loss_names = ("barlow_twins",)

  def config_sections(self):
    section = ml_collections.ConfigDict()
    section.lambda_ = 5e-3
    return {"test_barlow_twins": section}

  def init_state(self, config, variables, key, num_ids):
    return {"updates": jnp.zeros((), jnp.int32)}

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z = outputs["projection"]
    return losses.barlow_twins(z[0], z[1], lambda_=config.test_barlow_twins.lambda_), state, {}

  def after_update(self, config, state, params, updated):
    return {"updates": state["updates"] + jnp.asarray(updated, jnp.int32)}


@pytest.fixture
def barlow_twins_method():
  method = methods.register(CountingBarlowTwins())
  yield method
  assert methods.unregister(method.name) is method


def test_a_method_registered_from_outside_trains_and_keeps_its_state(barlow_twins_method, data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)  # base_config() has the new section
  config.test_barlow_twins.lambda_ = 0.01
  with pytest.raises(ValueError, match=r"`config.test_barlow_twins.lambda_` = 0.01 is a setting of the methods "
                                       r"\('test_barlow_twins',\), not of 'simclr'"):
    validation.validate_config(config, data=False)
  config.method = "test_barlow_twins"
  with pytest.raises(ValueError, match=r"for method 'test_barlow_twins' must be one of \('barlow_twins',\), "
                                       r"got 'nt_xent', which works with the methods \('simclr', 'dcl'\)"):
    validation.validate_config(config, data=False)
  config.loss.name = "barlow_twins"
  config.grad_accum_steps = 2  # 4 steps, 2 optimizer updates
  config.eval.at_end = True  # the evaluation embeds with the new method's model too
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 4 and 0.0 <= results["knn_accuracy"] <= 1.0
  assert int(final_state(config, str(tmp_path), 4).method_state["updates"]) == 2


def test_auto_loss_engine_is_sharded_on_a_mesh_of_several_devices():
  """`config.loss.impl = "auto"` (the default) with a mesh of more than one device: the loss runs under
  shard_map over every mesh axis (a sharded engine) and equals the single-device dense loss in value
  and gradient; on a one-device mesh it stays a single-device loss."""
  config = base_config()
  config.method, config.loss.name = "clip", "clip"
  assert config.loss.impl == "auto"
  rng = np.random.default_rng(5)
  image, text = (jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(2))
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def loss(image, text, scale, mesh):
    out = {"image": image, "text": text, "logit_scale": scale}
    return methods.get("clip").loss(config, out, {}, {}, mesh=mesh)[0]

  assert "shard_map" in str(jax.make_jaxpr(lambda *a: loss(*a, mesh))(image, text, 5.0))
  one = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                      devices=jax.devices()[:1])
  assert "shard_map" not in str(jax.make_jaxpr(lambda *a: loss(*a, one))(image, text, 5.0))
  got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, mesh), argnums=(0, 1, 2)))(image, text, 5.0)
  want = jax.jit(jax.value_and_grad(lambda i, t, s: losses.clip(i, t, logit_scale=s, impl="dense"),
                                    argnums=(0, 1, 2)))(image, text, 5.0)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_pallas_settings_from_the_config():
  """`config.loss.pallas` with `config.loss.impl = "pallas"`: the losses get `impl=Settings(...)` with the
  fields set (the others from the process default), which reach the kernels (their grid: 40 rows in
  blocks of 16, 40 columns in blocks of 32), and the loss equals the dense engine's in value and
  gradient. A field set with another impl, a bad value or an unknown key is an error naming the key."""

  def clip_config(impl, **fields):
    config = base_config()
    config.method, config.loss.name, config.loss.impl = "clip", "clip", impl
    for key, value in fields.items():
      config.loss.pallas[key] = value
    return config

  config = clip_config("pallas", flavour="gpu", interpret=True, block_rows=16, block_cols=32)
  validation.validate_config(config, data=False)
  assert methods.loss_impl(config) == pallas.Settings(
      flavour="gpu", interpret=True, block_rows=16, block_cols=32, num_warps=pallas.DEFAULT.num_warps,
      num_stages=pallas.DEFAULT.num_stages, max_fused_cols=pallas.DEFAULT.max_fused_cols)
  assert methods.loss_impl(clip_config("pallas")) == "pallas"  # nothing set: the default engine
  rng = np.random.default_rng(6)
  image, text = (jnp.asarray(rng.standard_normal((40, 8)), jnp.float32) for _ in range(2))

  def loss(config):
    return jax.value_and_grad(lambda i, t, s: methods.get("clip").loss(
        config, {"image": i, "text": t, "logit_scale": s}, {}, {})[0], argnums=(0, 1, 2))

  jaxpr = str(jax.make_jaxpr(loss(config))(image, text, 5.0))
  assert sorted(set(re.findall(r"grid=\(([0-9]+),\)", jaxpr))) == ["2", "3"]  # ceil(40/32), ceil(40/16)
  got, want = (jax.jit(loss(c))(image, text, 5.0) for c in (config, clip_config("dense")))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)

  with pytest.raises(ValueError, match=r"^`config.loss.pallas` \(block_rows=16\) sets the pallas engine's "
                                       r"settings, which need `config.loss.impl='pallas'`; got 'auto'\.$"):
    validation.validate_config(clip_config("auto", block_rows=16), data=False)
  with pytest.raises(ValueError, match=r"^`config.loss.pallas.block_rows` must be a positive integer or None, "
                                       r"got 0\.$"):
    validation.validate_config(clip_config("pallas", block_rows=0), data=False)
  with pytest.raises(ValueError, match=r"^`config.loss.pallas.flavour` must be one of .*got 'cuda'\.$"):
    validation.validate_config(clip_config("pallas", flavour="cuda"), data=False)
  config = clip_config("pallas")
  with config.unlocked():
    config.loss.pallas.blocks = 16
  with pytest.raises(ValueError, match=r"Unknown config key `config.loss.pallas.blocks`"):
    validation.validate_config(config, data=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,impl", [("simclr_digits", "ring"), ("clip_digits", "allgather")])
def test_sharded_loss_engines_train_like_the_default(name, impl, data_dir, tmp_path):
  """`config.loss.impl = "ring" | "allgather"`: the loss is split over the 8-device mesh (jaxcl.ops.sharded)
  and training follows the single-device-engine run ("dense", partitioned by GSPMD) step for step."""
  from jaxcl.train import metrics

  losses = {}
  for engine in ("dense", impl):
    config = tiny(load_recipe(name), data_dir, steps=3)
    config.log_every = 1
    config.loss.impl = engine
    loop.train_and_evaluate(config, str(tmp_path / engine), progress=False)
    losses[engine] = [r["loss"] for r in metrics.read_metrics(str(tmp_path / engine)) if "loss" in r]
  assert len(losses["dense"]) == 3
  np.testing.assert_allclose(losses[impl], losses["dense"], rtol=1e-4)


def test_sharded_engine_rejects_a_loss_without_axis_name(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.loss.name, config.loss.impl = "positive_aware_infonce", "ring"  # a single-device loss
  with pytest.raises(ValueError, match="sharded engine"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
