"""jaxcl.train.checkpoints: saving small arrays, falling back to an older checkpoint, moving bad ones
aside, and a checkpoint's shapes against a run's from orbax's metadata alone."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcl.train import checkpoints, devices, loop
from jaxcl.train import state as state_lib
from tests.test_reliability import checkpoint_steps
from tests.test_train import data_dir, final_state, load_recipe, tiny  # noqa: F401  (data_dir is a fixture)


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
