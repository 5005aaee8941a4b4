"""jaxcl.train.checkpoints: a checkpoint's shapes against a run's, from orbax's metadata alone."""

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcl.train import checkpoints


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
