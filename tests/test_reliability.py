"""Reliability of training runs: preemption (SIGTERM), kill -9, corrupted checkpoints, non-finite steps
and updates, checkpoints holding NaN/inf, config and data validation before any compute.

The preemption tests run the real command line (`python -m jaxcl.main`) in a subprocess with a tiny
SimCLR config on 2 CPU devices, interrupt it, run it again on the same workdir and compare the final
parameters bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxcl.main import PREEMPTED_EXIT_STATUS
from jaxcl.train import checkpoints, devices, finite, loop
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from jaxcl.train import metrics as metrics_lib
from jaxcl.train import optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"

# The tiny run of every subprocess test: the default recipe with an MLP encoder, ~20 ms per step.
TOTAL_STEPS = 40
CHECKPOINT_EVERY = 5
OVERRIDES = {
    "batch_size": 16,
    "total_steps": TOTAL_STEPS,
    "warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": CHECKPOINT_EVERY,
    "eval_every": 1000,
    "model.encoder": "mlp",
    "model.projection_dims": (32, 16),
    "eval.knn_k": 20,
    "eval.linear_probe": False,
    "eval.baselines": False,
}


def tiny_config(data_dir: str, **changes) -> ml_collections.ConfigDict:
  """configs/simclr_digits.py with OVERRIDES (and `changes`, dotted keys with "__" for ".")."""
  sys.path.insert(0, str(ROOT))
  try:
    from configs import simclr_digits  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = simclr_digits.get_config()
  config.data.data_dir = data_dir
  for key, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
    section = config
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
  return config


def cli_flags(data_dir: str, total_steps: int = TOTAL_STEPS, checkpoint_every: int = CHECKPOINT_EVERY) -> list[str]:
  values = {**OVERRIDES, "total_steps": total_steps, "checkpoint_every": checkpoint_every, "data.data_dir": data_dir}
  return [f"--config.{k}={v}".replace(" ", "") for k, v in values.items()]


def subprocess_env(devices: int = 2, compilation_cache: bool = True) -> dict[str, str]:
  """This environment on `devices` CPU devices, with the session's persistent compilation cache
  (tests/conftest.py: the first run compiles, the others load the executables) unless
  `compilation_cache=False` (a run compiled fresh)."""
  env = dict(os.environ)
  if not compilation_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


class Run:
  """`python -m jaxcl.main` on `workdir` in the background, its output in workdir/../<name>.log."""

  def __init__(self, workdir: pathlib.Path, data_dir: str, name: str, total_steps: int = TOTAL_STEPS,
               compilation_cache: bool = True):
    self.workdir = workdir
    self.log_path = workdir.parent / f"{workdir.name}-{name}.log"
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={workdir}",
         *cli_flags(data_dir, total_steps)],
        cwd=ROOT, env=subprocess_env(compilation_cache=compilation_cache), stdout=self._log,
        stderr=subprocess.STDOUT)

  def wait(self, timeout: float = 240) -> int:
    try:
      rc = self.proc.wait(timeout)
    finally:
      self._log.close()
    return rc

  def output(self) -> str:
    return self.log_path.read_text()

  def kill(self, sig: int) -> None:
    self.proc.send_signal(sig)

  def running(self) -> bool:
    return self.proc.poll() is None


def logged_steps(workdir: pathlib.Path) -> list[int]:
  return [r["step"] for r in metrics_lib.read_metrics(str(workdir)) if "loss" in r]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_until(predicate, run: Run, timeout: float = 240, poll: float = 0.005) -> bool:
  """Polls `predicate()` until it is true (True) or the run ends or times out (False)."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    if not run.running():
      return bool(predicate())
    time.sleep(poll)
  return False


def final_params(workdir: pathlib.Path, data_dir: str, step: int = TOTAL_STEPS):
  """The parameters of the checkpoint at `step` in `workdir` (restored as the loop restores them)."""
  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel

  config = tiny_config(data_dir)
  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, str(workdir))
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
  state, restored = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  manager.close()
  assert restored == step
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_bit_identical(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """An uninterrupted run of the tiny config: its final state. Compiled fresh, not loaded from the
  compilation cache the interrupted and resumed runs share: a cached executable that computed
  differently would show up as a mismatch."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  run = Run(workdir, data_dir, "straight", compilation_cache=False)
  assert run.wait() == 0, run.output()[-3000:]
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
  return final_params(workdir, data_dir)


# ------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_checkpoints_exits_cleanly_and_resumes_bit_identically(data_dir, straight, tmp_path):
  workdir = tmp_path / "run"
  run = Run(workdir, data_dir, "first")
  assert wait_until(lambda: len(logged_steps(workdir)) >= 8, run), run.output()[-3000:]
  run.kill(signal.SIGTERM)
  assert run.wait() == PREEMPTED_EXIT_STATUS, run.output()[-3000:]  # 75: a scheduler restarts it
  steps = logged_steps(workdir)
  stopped = steps[-1]
  assert stopped < TOTAL_STEPS, "the run ended before the signal: make it longer"
  assert f"Stopped at step {stopped}" in run.output()
  assert checkpoint_steps(workdir)[-1] == stopped  # the interrupted step itself was saved
  assert not (workdir / "results.json").exists()  # no evaluation of a half-trained model
  assert not (workdir / "jaxcl.lock").exists()  # the lock was released

  again = Run(workdir, data_dir, "second")
  assert again.wait() == 0, again.output()[-3000:]
  assert f"Resumed from checkpoint at step {stopped}" in again.output()
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))  # every step logged exactly once
  assert json.loads((workdir / "results.json").read_text())["step"] == TOTAL_STEPS
  assert_bit_identical(final_params(workdir, data_dir), straight)


def test_sigterm_before_the_training_loop_exits_75_and_releases_the_lock(data_dir, tmp_path):
  workdir = tmp_path / "run"
  run = Run(workdir, data_dir, "early")
  assert wait_until(lambda: (workdir / "jaxcl.lock").exists(), run, poll=0.001), run.output()[-3000:]
  run.kill(signal.SIGTERM)  # while the run compiles, before the loop's own handler is installed
  assert run.wait() == PREEMPTED_EXIT_STATUS, run.output()[-3000:]
  assert not (workdir / "jaxcl.lock").exists()


# ------------------------------------------------------------------------------------------ kill -9
def tmp_checkpoints(workdir: pathlib.Path) -> list[str]:
  d = workdir / "checkpoints"
  return sorted(p.name for p in d.iterdir() if TMP_SUFFIX in p.name) if d.exists() else []


def resumed_step(output: str) -> int:
  """The step a run resumed from (its "Resumed from checkpoint at step N" line), 0 if it started afresh."""
  lines = [l for l in output.splitlines() if l.startswith("Resumed from checkpoint at step ")]
  assert len(lines) <= 1, lines
  return int(lines[0].split()[5]) if lines else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_and_during_a_checkpoint_write(data_dir, straight, tmp_path):
  seed = int(time.time())
  rng = random.Random(seed)
  why = f"(random seed {seed})"
  workdir = tmp_path / "run"
  kills = []  # (last logged step, newest complete checkpoint, a write was in flight)
  for attempt, mode in enumerate(("random", "during-write", "random")):
    run = Run(workdir, data_dir, f"{attempt}-{mode}")
    if kills:
      start = kills[-1][0]
      if mode == "during-write":  # kill as soon as orbax starts writing a new step
        hit = wait_until(lambda: bool(tmp_checkpoints(workdir)), run, poll=0.001)
      else:
        target = min(start + rng.randint(1, 2 * CHECKPOINT_EVERY), TOTAL_STEPS - 2)
        hit = wait_until(lambda: (logged_steps(workdir) or [0])[-1] >= target, run)
    else:
      target = rng.randint(3, 2 * CHECKPOINT_EVERY + 3)
      hit = wait_until(lambda: (logged_steps(workdir) or [0])[-1] >= target, run)
    run.kill(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, run.output()[-3000:]
    assert hit, f"{mode}: the run ended before the kill {why}\n" + run.output()[-3000:]
    complete = checkpoint_steps(workdir)
    in_flight = tmp_checkpoints(workdir)
    if mode == "during-write":
      assert in_flight, f"the kill missed the write {why}"  # a partial checkpoint is on disk
    kills.append((logged_steps(workdir)[-1], complete[-1] if complete else 0, bool(in_flight)))
    if attempt:  # this run resumed from the newest complete checkpoint the previous kill left
      assert resumed_step(run.output()) == kills[-2][1], why

  final = Run(workdir, data_dir, "final")
  assert final.wait() == 0, final.output()[-3000:]
  assert resumed_step(final.output()) == kills[-1][1], why  # not the partial one
  for last_logged, newest_complete, in_flight in kills:
    lost = last_logged - newest_complete
    # At most checkpoint_every steps are lost: with async_checkpointing=False (the default) training
    # waits for each save, so even a kill in the middle of a write loses only the steps since the
    # checkpoint before it (with async writes that would be up to 2 x checkpoint_every).
    assert lost <= CHECKPOINT_EVERY, (kills, why)
  assert tmp_checkpoints(workdir) == []  # the partial writes were cleaned up
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))  # re-run steps logged once
  assert_bit_identical(final_params(workdir, data_dir), straight)


# -------------------------------------------------------------------------------- non-finite steps
def poison_step(monkeypatch, bad_step: int) -> None:
  """Makes the images of training step `bad_step` (1-based) NaN, so its loss and gradients are NaN."""
  original = step_lib.train_step

  def poisoned(config, setup, state, batch):
    bad = state.step == bad_step - 1
    batch = dict(batch, image=jnp.where(bad, jnp.nan, batch["image"]))
    return original(config, setup, state, batch)

  monkeypatch.setattr(step_lib, "train_step", poisoned)


def restore_full_state(workdir, config, step, target=None):
  """The whole state of checkpoint `step` in `workdir`, read by orbax alone (no check of its values);
  `target`: the restore target (ShapeDtypeStructs with shardings), built from `config` when None."""
  from jaxcl.data import pipeline  # pylint: disable=import-outside-toplevel

  if target is None:
    setup = state_lib.build_setup(config)
    abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  manager = checkpoints.checkpoint_manager(config, str(workdir))
  try:
    # Restore exactly `step`: the manager restores the newest, so hide the newer ones from it.
    it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=__import__("grain").checkpoint.CheckpointRestore(it)))["state"]
  finally:
    manager.close()


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


# ---------------------------------------------------------------------- checkpoints with bad values
def flip_until_nonfinite(workdir: pathlib.Path, config, step: int, scratch: pathlib.Path) -> list[str]:
  """Flips (XOR 0xff) 4 KB of the largest data file of checkpoint `step` in `workdir`, at the first
  4 KB-aligned offset where orbax still reads the checkpoint but some values come back NaN or inf
  (found on copies in `scratch`, checked with numpy on the host). Returns the paths of those arrays.

  The arrays are zstd-compressed without a checksum: a flip inside a block's data decodes silently to
  other numbers; one in the framing makes orbax raise, the unreadable case (tests/test_train.py).
  """
  (data,) = sorted((f for f in (workdir / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()),
                   key=lambda f: f.stat().st_size)[-1:]
  relative = data.relative_to(workdir)
  original = data.read_bytes()
  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  for offset in range(0, len(original) - 4096, 4096):
    flipped = bytearray(original)
    flipped[offset:offset + 4096] = bytes(b ^ 0xFF for b in original[offset:offset + 4096])
    copy = scratch / str(offset)  # a fresh path each time: nothing cached from an earlier read
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / str(step), copy / "checkpoints" / str(step))
    (copy / relative).write_bytes(bytes(flipped))
    try:
      state = restore_full_state(copy, config, step, target)
    except Exception:  # pylint: disable=broad-except
      continue
    bad = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in jax.tree_util.tree_leaves_with_path(state)
           if np.issubdtype(x.dtype, np.floating) and not np.isfinite(np.asarray(x)).all()]
    if bad:
      data.write_bytes(bytes(flipped))
      return bad
  pytest.fail(f"no 4 KB flip in {data} gives a readable checkpoint with non-finite values")


def test_a_checkpoint_with_flipped_bytes_is_moved_aside_and_the_previous_one_restored(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=2)
  workdir = tmp_path / "run"
  assert loop.train_and_evaluate(config, str(workdir), progress=False, stop_at=4)["stopped"]
  assert checkpoint_steps(workdir) == [2, 4]
  bad = flip_until_nonfinite(workdir, config, 4, tmp_path / "scan")
  capsys.readouterr()
  results = loop.train_and_evaluate(config, str(workdir), progress=False)
  out = capsys.readouterr().out
  shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
  assert (f"warning: checkpoint at step 4 holds non-finite values (NaN or inf in {len(bad)} array(s): "
          f"{shown}); trying an older one") in out
  (moved,) = (workdir / "checkpoints_quarantine").iterdir()
  assert moved.name.startswith("4-") and (moved / "state").is_dir()
  assert "warning: moved the checkpoint of step 4, which holds non-finite values" in out
  assert f"to {moved}; resuming from step 2" in out and "Resumed from checkpoint at step 2" in out
  assert results["step"] == 6 and checkpoint_steps(workdir) == [2, 4, 6]
  state = restore_full_state(workdir, config, 6)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
             if np.issubdtype(x.dtype, np.floating))


def test_nonfinite_leaves_names_the_arrays():
  tree = {"params": {"a": jnp.ones((3,)), "b": jnp.array([1.0, jnp.inf])},
          "opt_state": (jnp.zeros((2, 2)).at[1, 0].set(jnp.nan), jnp.int32(3)), "step": jnp.int32(1)}
  assert finite.nonfinite_leaves(tree) == ["opt_state/0", "params/b"]
  assert finite.nonfinite_leaves({"a": jnp.ones((2,), jnp.bfloat16), "i": jnp.int32(0)}) == []


# --------------------------------------------------------------------- validation before any compute
@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if training gets past validation (the mesh is the first thing built after it)."""

  def boom(*args, **kwargs):
    raise AssertionError("compute started before the bad input was reported")

  monkeypatch.setattr(devices, "make_mesh", boom)


def expect_error(config, workdir, match):
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(config, str(workdir), progress=False)
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_unknown_keys_and_wrong_types_are_errors(data_dir, no_compute, tmp_path):
  config = tiny_config(data_dir)
  config.unlock()
  config.batchsize = 64  # a typo in a recipe file (an unlocked ConfigDict accepts new keys)
  expect_error(config, tmp_path, r"Unknown config key `config.batchsize` \(did you mean `config.batch_size`\?\)")
  config = tiny_config(data_dir)
  config.unlock()
  config.model.projection_dim = 64
  expect_error(config, tmp_path, r"Unknown config key `config.model.projection_dim`")
  for key, value, message in [
      ("batch_size", "64", r"`config.batch_size` must be int \(like the default 256\), got '64' of type str"),
      ("learning_rate", "0.1", r"`config.learning_rate` must be float .* got '0.1' of type str"),
      ("eval.linear_probe", 1, r"`config.eval.linear_probe` must be bool"),
      ("model.projection_dims", 32, r"`config.model.projection_dims` must be a tuple of ints"),
  ]:
    plain = tiny_config(data_dir).to_dict()  # configs built by hand escape ConfigDict's type checks
    section = plain
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
    expect_error(ml_collections.ConfigDict(plain), tmp_path, message)
  plain = tiny_config(data_dir).to_dict()
  del plain["eval"]["knn_k"]
  expect_error(ml_collections.ConfigDict(plain), tmp_path, r"The config lacks the keys \['config.eval.knn_k'\]")
  config = tiny_config(data_dir)
  with pytest.raises(TypeError, match="batch_size"):  # and on a ConfigDict, at assignment
    config.batch_size = "64"
  for key, value, message in [("on_nonfinite", "ignore", r"`config.on_nonfinite` must be one of \('stop', 'skip'\)"),
                              ("learning_rate", -1.0, r"`config.learning_rate` must be a finite number >= 0"),
                              ("keep_checkpoints", 0, r"`config.keep_checkpoints` must be a positive integer"),
                              ("data__name", "imagenet", r"`config.data.name` must be one of")]:
    expect_error(tiny_config(data_dir, **{key: value}), tmp_path, message)


def test_batch_size_not_divisible_by_the_devices(data_dir, no_compute, tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  expect_error(tiny_config(data_dir, batch_size=20), tmp_path,
               r"`config.batch_size` must be a positive multiple of the device count 8, got 20")


def test_loss_name_logit_scale_and_encoder_are_checked_before_any_folder(data_dir, no_compute, tmp_path):
  workdir = tmp_path / "run"
  for changes, message in [
      ({"loss__name": "ntxent"}, r"`config.loss.name` for method 'simclr' must be one of \('nt_xent', 'dcl', "
                                 r"'dclw', 'macl', 'hn_nce', 'positive_aware_infonce', 'isogclr', "
                                 r"'mcl_nt_xent'\), got 'ntxent'"),
      ({"method": "multiview", "num_views": 3, "loss__name": "nt_xent"},
       r"`config.loss.name` for method 'multiview' must be one of \('multiview_infonce', 'mv_dhel', "
       r"'pairwise_nt_xent'\), got 'nt_xent'"),
      ({"method": "clip", "loss__name": "clip", "loss__logit_scale_init": 0.0},
       r"`config.loss.logit_scale_init` must be a finite number > 0 \(the model learns its logarithm\), got 0.0"),
      ({"method": "clip", "loss__name": "siglip", "loss__logit_scale_init": -10.0},
       r"`config.loss.logit_scale_init` must be a finite number > 0 .*got -10.0"),
      ({"model__encoder": "resnet19"}, r"`config.model.encoder` must be one of \('resnet18', .*'mlp'\) \(an "
                                       r"image encoder of jaxcl.models.build_model\), got 'resnet19'"),
      ({"model__encoder": "text_transformer"}, r"`config.model.encoder` must be one of .*got 'text_transformer'"),
      ({"momentum__queue_size": 1024}, r"`config.momentum.queue_size` = 1024 is a setting of the methods "
                                       r"\('moco', 'byol'\), not of 'simclr': leave it at 0"),
      ({"method": "supcon", "loss__name": "supcon", "mcl__num_clusters": 4},
       r"`config.mcl.num_clusters` = 4 is a setting of the methods \('simclr',\), not of 'supcon'"),
  ]:
    with pytest.raises(ValueError, match=message):
      loop.train_and_evaluate(tiny_config(data_dir, **changes), str(workdir), progress=False)
    assert not workdir.exists()  # checked before the workdir was created


def write_images(folder: pathlib.Path, names, size=(8, 8)):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for name in names:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)


def folder_config(data_dir, folder, **changes):
  return tiny_config(data_dir, data__name="folder", data__folder=str(folder), **changes)


def test_bad_image_folders_are_errors_before_compute(data_dir, no_compute, tmp_path):
  workdir = tmp_path / "work"
  expect_error(folder_config(data_dir, tmp_path / "missing"), workdir, r"`data_config.folder` .* is not a directory")
  empty = tmp_path / "empty"
  empty.mkdir()
  expect_error(folder_config(data_dir, empty), workdir, r"Image folder .*empty' contains no images")
  (empty / "notes.txt").write_text("not an image")
  expect_error(folder_config(data_dir, empty), workdir, r"contains no images")

  broken = tmp_path / "broken"
  write_images(broken, [f"a/{i}.png" for i in range(3)] + [f"b/{i}.png" for i in range(3)])
  (broken / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
  expect_error(folder_config(data_dir, broken), workdir, r"Unreadable image .*9.png")
  good = (broken / "a" / "0.png").read_bytes()
  (broken / "b" / "9.png").write_bytes(good[: len(good) // 2])  # a truncated file
  expect_error(folder_config(data_dir, broken), workdir, r"Unreadable image .*9.png")

  # the evaluation split is checked up front too, not after training
  split = tmp_path / "split"
  write_images(split, [f"train/a/{i}.png" for i in range(4)] + [f"train/b/{i}.png" for i in range(4)])
  (split / "test").mkdir()
  expect_error(folder_config(data_dir, split), workdir, r"Image folder .*test' contains no images")


def test_captions_file_with_missing_entries_is_an_error_before_compute(data_dir, no_compute, tmp_path):
  folder = tmp_path / "images"
  names = [f"{i}.png" for i in range(6)]
  write_images(folder, names)
  (folder / "captions.tsv").write_text("".join(f"{n}\ta photo number {i}\n" for i, n in enumerate(names[:4])))
  config = folder_config(data_dir, folder, data__captions_file="captions.tsv", method="clip",
                         loss__name="clip")
  expect_error(config, tmp_path / "work", r"Captions file .*captions.tsv' has no caption for 2 of 6 images .*'4.png', '5.png'")
  (folder / "captions.tsv").write_text("0.png\ta photo\n1.png\t\n")
  expect_error(config, tmp_path / "work", r"line 2: empty caption for '1.png'")
  config.data.captions_file = "nope.tsv"
  expect_error(config, tmp_path / "work", r"`data_config.captions_file` .*nope.tsv' does not exist")
  # image-text training needs captions or class folders to make them from
  config.data.captions_file = ""
  expect_error(config, tmp_path / "work", r"method 'clip' trains on image-caption pairs, but .* neither captions")


# ------------------------------------------------------------------------------------------- soak
@pytest.mark.slow
def test_soak_kill_9_every_20_steps_ends_bit_identical(tmp_path):
  """The short version of experiments/soak_resume.py: 60 steps, a kill -9 and restart every 20."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("soak_resume", ROOT / "experiments" / "soak_resume.py")
  soak = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(soak)
  r = soak.soak(steps=60, every=20, checkpoint_every=5, root=str(tmp_path), seed=0, verbose=False)
  assert not r["problems"], soak.report(r)
  assert [k["killed_at"] is not None for k in r["kills"]] == [True, True, False]
  assert not r["mismatched"] and r["arrays"] > 10


# ------------------------------------------------------------------------------ multi-host SIGTERM
def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_dir, tmp_path):
  """Two JAX processes (jax.distributed on CPU): the preemption notice reaches only process 1; JAX's
  preemption sync point makes both stop, save the same step and exit cleanly; both resume from it.
  A cross-process step takes ~0.1 s on a loaded CPU and the stop comes ~10 steps after the signal
  (sent once 20 steps are logged), so 120 steps leave a wide margin; periodic checkpoints only every
  100 steps (each is a cross-process save): the step the run stops at is saved by the preemption itself."""
  workdir, steps, checkpoint_every = tmp_path / "run", 120, 100

  def launch(name):
    port, runs = free_port(), []
    for pid in (0, 1):
      run = Run.__new__(Run)
      run.workdir, run.log_path = workdir, tmp_path / f"{name}-{pid}.log"
      run._log = open(run.log_path, "w")  # pylint: disable=protected-access
      env = subprocess_env(devices=1)
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
      run.proc = subprocess.Popen(
          [sys.executable, "-m", "jaxcl.main", "--config=configs/simclr_digits.py", f"--workdir={workdir}",
           *cli_flags(data_dir, steps, checkpoint_every)],
          cwd=ROOT, env=env, stdout=run._log, stderr=subprocess.STDOUT)  # pylint: disable=protected-access
      runs.append(run)
    return runs

  first = launch("first")
  assert wait_until(lambda: len(logged_steps(workdir)) >= 20, first[0]), first[0].output()[-3000:]
  first[1].kill(signal.SIGTERM)
  codes = [r.wait() for r in first]
  outputs = [r.output() for r in first]
  assert codes == [PREEMPTED_EXIT_STATUS] * 2, outputs[1][-3000:]
  stopped = [[l for l in o.splitlines() if l.startswith("Stopped at step ")] for o in outputs]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped  # the same step on both processes
  step = int(stopped[0][0].split()[3].rstrip(";"))
  assert step < steps and checkpoint_steps(workdir)[-1] == step

  again = launch("second")
  assert [r.wait() for r in again] == [0, 0], again[0].output()[-3000:]
  assert all(resumed_step(r.output()) == step for r in again)
  assert logged_steps(workdir) == list(range(1, steps + 1))
