"""jaxcl.train.finite: a non-finite step or update stops the run keeping the last good checkpoint,
or is skipped (`config.on_nonfinite="skip"`), and the messages name the arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl.train import finite, loop
from jaxcl.train import metrics as metrics_lib
from jaxcl.train import optim
from jaxcl.train import step as step_lib
from tests.helpers import checkpoint_steps, logged_steps, restore_full_state, tiny_config


def poison_step(monkeypatch, bad_step: int) -> None:
  """Makes the images of training step `bad_step` (1-based) NaN, so its loss and gradients are NaN."""
  original = step_lib.train_step

  def poisoned(config, setup, state, batch):
    bad = state.step == bad_step - 1
    batch = dict(batch, image=jnp.where(bad, jnp.nan, batch["image"]))
    return original(config, setup, state, batch)

  monkeypatch.setattr(step_lib, "train_step", poisoned)


def restore_state(workdir, config, step):
  state = restore_full_state(workdir, config, step)
  return [np.asarray(x) for x in jax.tree.leaves(state.params)], int(state.step)


def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(data_dir, monkeypatch, tmp_path):
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=2)
  poison_step(monkeypatch, 4)  # a checkpoint step: its (bad) state must not be saved
  with pytest.raises(finite.NonFiniteError) as e:
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  message = str(e.value)
  assert message.startswith("step 4: non-finite values: the loss is nan; the gradient of ")
  assert "(ProjectionHead_0/" in message  # names the parameters whose gradient is not finite
  assert "the last good checkpoint (step 2) is kept" in message.lower()
  assert checkpoint_steps(tmp_path) == [2]
  monkeypatch.undo()
  params, step = restore_state(tmp_path, config, 2)  # intact and loadable
  assert step == 2 and all(np.isfinite(p).all() for p in params)
  # and training resumes from it when the cause is gone
  assert loop.train_and_evaluate(config, str(tmp_path), progress=False, stop_at=4) == {"step": 4, "stopped": True}


def test_nonfinite_step_between_checkpoints_is_named_one_step_late(data_dir, monkeypatch, tmp_path):
  """Step s is checked after step s+1 was dispatched (no host sync per step): a non-finite step that is
  no checkpoint step is still named, and no checkpoint after it is saved."""
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=4)
  poison_step(monkeypatch, 3)  # found while step 4 (a checkpoint step) is queued: 4 must not be saved
  with pytest.raises(finite.NonFiniteError, match=r"^step 3: non-finite values: the loss is nan;.*"
                     r"The last good checkpoint \(none yet\) is kept"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert checkpoint_steps(tmp_path) == []
  assert logged_steps(tmp_path) == [1, 2]  # log_every=1: the record of step 3 is not written


def test_nonfinite_step_is_skipped_when_configured(data_dir, monkeypatch, tmp_path, capsys):
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=1, keep_checkpoints=10, on_nonfinite="skip")
  poison_step(monkeypatch, 4)
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 6
  out = capsys.readouterr().out
  assert "warning: step 4: non-finite values: the loss is nan" in out
  assert "skipping it (config.on_nonfinite='skip')" in out
  monkeypatch.undo()
  before, _ = restore_state(tmp_path, config, 3)
  skipped, _ = restore_state(tmp_path, config, 4)
  after, _ = restore_state(tmp_path, config, 5)
  for b, s, a in zip(before, skipped, after):
    np.testing.assert_array_equal(b, s)  # the update of step 4 was not applied
  assert any(not np.array_equal(s, a) for s, a in zip(skipped, after))  # step 5 trained again
  losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(tmp_path)) if "loss" in r}
  assert np.isnan(losses[4]) and np.isfinite([losses[s] for s in (1, 2, 3, 5, 6)]).all()


def poison_update(monkeypatch, bad_step: int) -> None:
  """Makes the optimizer's update of step `bad_step` (1-based) infinite: its loss and gradients stay
  finite, the parameters it would give do not (inf, or NaN where the update is 0)."""
  original = optim.make_optimizer

  def poisoned(config):
    blow_up = optax.scale_by_schedule(lambda count: jnp.where(count == bad_step - 1, jnp.inf, 1.0))
    return optax.chain(original(config), blow_up)

  monkeypatch.setattr(optim, "make_optimizer", poisoned)


def test_an_update_that_would_make_the_state_nonfinite_is_not_applied(data_dir, monkeypatch, tmp_path):
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=2)
  poison_update(monkeypatch, 4)  # a checkpoint step: its (bad) state must not be saved
  with pytest.raises(finite.NonFiniteError) as e:
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert str(e.value) == (
      "step 4: non-finite values: the updated state would hold them in params; the update was not "
      "applied; stopping (config.on_nonfinite='stop'). The last good checkpoint (step 2) is kept in "
      f"{tmp_path}/checkpoints.")
  assert checkpoint_steps(tmp_path) == [2]
  params, step = restore_state(tmp_path, config, 2)  # (the poisoned optimizer's state structure)
  assert step == 2 and all(np.isfinite(p).all() for p in params)


def test_nonfinite_message_names_the_gradient():
  grads_ok = {"params": {"encoder": {"kernel": True, "bias": True}, "head": {"kernel": False}}}
  m = {"loss": np.float32(1.5), "grad_norm": np.float32(np.inf), "grad_finite": grads_ok}
  assert finite.nonfinite_message(7, m) == (
      "step 7: non-finite values: the gradient of 1 parameter array(s) is not finite "
      "(params/head/kernel; gradient norm inf)")


def test_nonfinite_leaves_names_the_arrays():
  tree = {"params": {"a": jnp.ones((3,)), "b": jnp.array([1.0, jnp.inf])},
          "opt_state": (jnp.zeros((2, 2)).at[1, 0].set(jnp.nan), jnp.int32(3)), "step": jnp.int32(1)}
  assert finite.nonfinite_leaves(tree) == ["opt_state/0", "params/b"]
  assert finite.nonfinite_leaves({"a": jnp.ones((2,), jnp.bfloat16), "i": jnp.int32(0)}) == []
