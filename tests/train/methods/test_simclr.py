"""iSogCLR in the training system (jaxcl.train.methods.simclr): per-example state in the train state
(issue 8).

"Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic Temperature
Individualization" (Qiu et al., 2023) keeps a temperature τ_i and a normaliser u_i per example, indexed by
the stable example id `batch["index"]`, in `TrainState.method_state`."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcl.data import pipeline
from jaxcl.losses.temperature import IsogclrState
from jaxcl.train import devices, loop, methods, validation
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from tests.helpers import final_state, load_recipe, tiny


TAU0 = 0.1  # base_config().isogclr.tau_init


def _config(data_dir, steps):
  return tiny(load_recipe("isogclr_digits"), data_dir, steps=steps)


def _seen_ids(config, steps):
  """The example ids of the first `steps` batches (the train loader is deterministic given the seed)."""
  it = iter(pipeline.make_train_loader(config.data, split=config.data.train_split,
                                       global_batch_size=config.batch_size, seed=config.seed))
  return np.unique(np.concatenate([next(it)["index"] for _ in range(steps)]))


def test_isogclr_is_only_for_simclr():
  config = load_recipe("isogclr_digits")
  config.method = "dcl"
  with pytest.raises(ValueError, match=r"got 'isogclr', which works with the methods \('simclr',\)"):
    validation.validate_config(config, data=False)
  other = load_recipe("simclr_digits")  # a stateless loss has an empty method state
  assert methods.get("simclr").init_state(other, {}, jax.random.key(0), 10) == {}


def test_train_step_shards_updates_and_guards_the_loss_state(data_dir):
  config = _config(data_dir, steps=2)
  config.on_nonfinite = "skip"
  infos = validation.validate_config(config)
  mesh = devices.make_mesh(config)
  setup = state_lib.build_setup(config, infos["train"], mesh)
  abstract, shardings = state_lib.state_shardings(config, setup, mesh)
  state = jax.jit(functools.partial(state_lib.init_state, config, setup), out_shardings=shardings)(
      jax.random.key(0))
  assert isinstance(state.method_state, IsogclrState)
  step = jax.jit(functools.partial(step_lib.train_step, config, setup), out_shardings=(shardings, None))
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
  host = next(it)
  new, m = step(state, devices.to_global(setup.text.prepare(config, host, 0), mesh))
  assert bool(m["finite"])
  for arr in new.method_state:  # (1800,) split in 8 shards of 225 along the batch mesh axes
    assert arr.shape == (1800,)
    assert arr.sharding.spec == P(devices.BATCH_AXES)
    assert {s.data.shape for s in arr.addressable_shards} == {(225,)}
  ids = np.asarray(host["index"])
  tau, log_u = np.asarray(new.method_state.tau), np.asarray(new.method_state.log_u)
  others = np.setdiff1d(np.arange(1800), ids)
  assert np.all(tau[ids] != np.float32(TAU0)) and np.all(tau[others] == np.float32(TAU0))
  assert np.all(log_u[ids] > -1e3) and np.all(log_u[others] == methods.UNSEEN_LOG_U)  # stored finite
  # On the 8-device mesh the loss runs on the sharded engine ("auto"): the loss and the new state of the
  # same step with the dense engine (GSPMD-partitioned).
  assert methods.engine_options(config, mesh)["axis_name"]
  dense_config = _config(data_dir, steps=2)
  dense_config.loss.impl = "dense"
  dense_step = jax.jit(functools.partial(step_lib.train_step, dense_config, setup), out_shardings=(shardings, None))
  dense, dm = dense_step(state, devices.to_global(setup.text.prepare(config, host, 0), mesh))
  np.testing.assert_allclose(float(m["loss"]), float(dm["loss"]), rtol=1e-5)
  for a, b in zip(new.method_state, dense.method_state):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # A non-finite step (NaN images) keeps the old loss state, like the parameters.
  bad = dict(host, image=np.full_like(host["image"], np.nan), index=np.asarray(next(it)["index"]))
  kept, m = step(new, devices.to_global(setup.text.prepare(config, bad, 1), mesh))
  assert not bool(m["finite"])
  for a, b in zip(kept.method_state, new.method_state):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_recipe_trains_and_resumes_with_the_saved_loss_state(data_dir, tmp_path):
  steps = 6
  straight = _config(data_dir, steps)
  results = loop.train_and_evaluate(straight, str(tmp_path / "straight"), progress=False)
  assert results == {"step": steps}  # tiny runs end without the evaluation
  # The same run stopped after 3 of 6 steps (as a preemption would), then resumed from its checkpoint.
  interrupted = _config(data_dir, steps)
  stopped = loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False, stop_at=3)
  assert stopped == {"step": 3, "stopped": True}
  loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False)

  a = final_state(straight, str(tmp_path / "straight"), steps)
  b = final_state(straight, str(tmp_path / "resumed"), steps)
  for x, y in zip(jax.tree.leaves((a.method_state, a.params)), jax.tree.leaves((b.method_state, b.params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # τ moved for exactly the examples the run saw; every other slot (incl. the padding) kept τ₀.
  seen = _seen_ids(straight, steps)
  tau = np.asarray(a.method_state.tau)
  unseen = np.setdiff1d(np.arange(tau.shape[0]), seen)
  assert len(seen) > 16 and np.all(tau[seen] != np.float32(TAU0))
  assert np.all(tau[unseen] == np.float32(TAU0))
  assert a.method_state.tau.sharding.spec == P(devices.BATCH_AXES)
