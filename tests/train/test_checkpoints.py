"""jaxcl.train.checkpoints: saving small arrays, falling back to an older checkpoint, moving bad
ones aside (unreadable, or holding NaN/inf), a checkpoint's shapes against a run's from orbax's metadata
alone, and kill -9 at random moments and during a write (the command line in a subprocess, on 2 CPU
devices, compared bit for bit with an uninterrupted run)."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcl.train import checkpoints, devices, loop
from jaxcl.train import state as state_lib
from tests.helpers import (
    assert_bit_identical, CHECKPOINT_EVERY, checkpoint_steps, final_params, final_state, load_recipe, logged_steps,
    restore_full_state, resumed_step, Run, tiny, tiny_config, TOTAL_STEPS, wait_until)


def _saved(tmp_path, tree):
  manager = ocp.CheckpointManager(tmp_path / "c", options=ocp.CheckpointManagerOptions(create=True),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
  manager.wait_until_finished()
  return manager


def test_shape_mismatches_name_each_array_that_differs(tmp_path):
  tree = {"params": {"dense": {"kernel": np.zeros((4, 8), np.float32), "bias": np.zeros(8, np.float32)}},
          "step": np.int32(3), "opt": [np.zeros(2, np.float32), np.zeros((2, 2), np.float32)]}
  manager = _saved(tmp_path, tree)
  spec = lambda shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
  same = jax.tree.map(lambda x: spec(np.shape(x)), tree)
  assert checkpoints.shape_mismatches(manager, 3, same) == []
  other = dict(same, params={"dense": {"kernel": spec((4, 6)), "bias": spec((6,))}}, opt=[spec((2,)), spec((3, 2))])
  assert checkpoints.shape_mismatches(manager, 3, other) == [
      "opt/1: saved (2, 2), this config (3, 2)",
      "params/dense/bias: saved (8,), this config (6,)",
      "params/dense/kernel: saved (4, 8), this config (4, 6)"]
  # a subtree is matched by its paths; a step without metadata: nothing to say (the restore says it)
  assert checkpoints.shape_mismatches(manager, 3, {"params": other["params"]}) == [
      "params/dense/bias: saved (8,), this config (6,)", "params/dense/kernel: saved (4, 8), this config (4, 6)"]
  assert checkpoints.shape_mismatches(manager, 7, other) == []
  manager.close()
  assert checkpoints.summary(["a", "b", "c", "d", "e"]) == "a; b; c; and 2 more"
  assert checkpoints.summary(["a", "b"]) == "a; b"


def test_small_replicated_arrays_are_saved_without_per_replica_slices(tmp_path):
  """`checkpoints.checkpoint_manager` has orbax write a replicated array whole from one replica when its
  per-replica slices would be under `MIN_REPLICA_SLICE_BYTES`: saving 20 small arrays replicated over
  the 8 devices compiles nothing (replica-parallel would cut each into 8 slices on device, a compiled
  slice per shape); an array with 1 MiB slices is still cut (one compile at least); both restore."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  replicated = NamedSharding(mesh, P())
  small = {f"w{i}": jax.device_put(np.full((8 + i, 16), i, np.float32), replicated) for i in range(20)}
  big = {"big": jax.device_put(np.arange(8 * 2**18, dtype=np.float32).reshape(8 * 64, 2**12), replicated)}
  compiles = []

  def count(event, secs, **kwargs):
    del secs, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    _save_and_restore(tiny(load_recipe("simclr_digits"), str(tmp_path)), tmp_path, small, big, compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


def _save_and_restore(config, tmp_path, small, big, compiles):
  for step, tree in ((1, small), (2, big)):
    manager = checkpoints.checkpoint_manager(config, str(tmp_path / str(step)))
    before = len(compiles)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)), force=True)
    manager.wait_until_finished()
    assert (len(compiles) - before == 0) if tree is small else (len(compiles) - before >= 1), compiles[before:]
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
    for k, v in tree.items():
      np.testing.assert_array_equal(np.asarray(restored["state"][k]), np.asarray(v))
    manager.close()


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, capsys):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=6)
  config.keep_checkpoints = 2
  loop.train_and_evaluate(config, str(tmp_path), progress=False, stop_at=4)
  ckpt = tmp_path / "checkpoints"
  assert checkpoint_steps(tmp_path) == [2, 4]
  for f in (ckpt / "4" / "state").rglob("*"):  # truncate every file of the latest state
    if f.is_file():
      f.write_bytes(b"")
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  out = capsys.readouterr().out
  assert "checkpoint at step 4 is unreadable" in out
  # moved aside, not deleted, into a folder the message names; orbax no longer counts it
  (moved,) = (tmp_path / "checkpoints_quarantine").iterdir()
  assert moved.name.startswith("4-") and (moved / "state" / "_METADATA").is_file()
  assert "warning: moved the checkpoint of step 4, which is unreadable (" in out
  assert f"to {moved}; resuming from step 2" in out
  assert results["step"] == 6
  assert checkpoint_steps(tmp_path) == [4, 6]  # keep_checkpoints=2 over the steps saved after the fallback


def test_a_transient_read_error_moves_the_checkpoint_aside_intact(data_dir, tmp_path, capsys, monkeypatch):
  from jaxcl.data import pipeline

  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  ckpt = tmp_path / "checkpoints"
  assert checkpoint_steps(tmp_path) == [2, 4]
  setup = state_lib.build_setup(config)
  abstract, shardings = state_lib.state_shardings(config, setup, devices.make_mesh(config))
  manager = checkpoints.checkpoint_manager(config, str(tmp_path))
  restore = manager.restore

  def flaky(step, *args, **kwargs):  # a network file system that fails once on step 4
    if step == 4:
      raise OSError("transient: connection reset by peer")
    return restore(step, *args, **kwargs)

  monkeypatch.setattr(manager, "restore", flaky)
  it = iter(pipeline.make_train_loader(config.data, split="train", global_batch_size=16, seed=0))
  capsys.readouterr()
  state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, it)
  assert step == 2 and int(state.step) == 2
  assert manager.all_steps() == [2] and manager.latest_step() == 2  # the manager does not see step 4
  manager.close()
  (moved,) = (tmp_path / "checkpoints_quarantine").iterdir()
  assert capsys.readouterr().out.splitlines()[-1] == (
      "warning: moved the checkpoint of step 4, which is unreadable (OSError: transient: connection reset "
      f"by peer), to {moved}; resuming from step 2")
  os.rename(moved, ckpt / "4")  # the checkpoint is intact: put back, it restores
  assert int(final_state(config, str(tmp_path), 4).step) == 4


def test_checkpoints_of_another_config_are_an_error(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=2)
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config.model.projection_dims = (32, 8)  # parameters of another shape
  os.remove(tmp_path / "config.json")  # no config record (as from an older jaxcl): the restore itself fails
  # The shapes are compared from orbax's metadata, before any array is read; the error names them.
  with pytest.raises(RuntimeError, match=r"(?s)can be restored into this config.*step 2 holds arrays of other "
                                         r"shapes than this config's \(params/ProjectionHead_0/dense1/bias: "
                                         r"saved \(16,\), this config \(8,\);"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)


TMP_SUFFIX = ".orbax-checkpoint-tmp"


# ------------------------------------------------------------------------------------------ kill -9
def tmp_checkpoints(workdir: pathlib.Path) -> list[str]:
  d = workdir / "checkpoints"
  return sorted(p.name for p in d.iterdir() if TMP_SUFFIX in p.name) if d.exists() else []


@pytest.mark.slow
def test_kill_9_at_random_moments_and_during_a_checkpoint_write(data_dir, straight, tmp_path):
  seed = int(time.time())
  rng = random.Random(seed)
  why = f"(random seed {seed})"
  workdir = tmp_path / "run"
  kills = []  # (last logged step, newest complete checkpoint, a write was in flight)
  # A kill at a random step of a fresh run, then one as the resumed run starts writing a checkpoint, then a
  # run to the end (tests/train/test_loop.py's soak test kills a run once more, late in a window).
  for attempt, mode in enumerate(("random", "during-write")):
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


# ---------------------------------------------------------------------- checkpoints with bad values
def flip_until_nonfinite(workdir: pathlib.Path, config, step: int, scratch: pathlib.Path) -> list[str]:
  """Flips (XOR 0xff) 4 KB of the largest data file of checkpoint `step` in `workdir`, at the first
  4 KB-aligned offset where orbax still reads the checkpoint but some values come back NaN or inf
  (found on copies in `scratch`, checked with numpy on the host). Returns the paths of those arrays.

  The arrays are zstd-compressed without a checksum: a flip inside a block's data decodes silently to
  other numbers; one in the framing makes orbax raise, the unreadable case (test_corrupted_latest_checkpoint_falls_back_to_the_previous_one).
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
