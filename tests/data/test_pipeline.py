"""jaxcl.data.pipeline: seeded grain loaders over the digits, sharding over processes, iterator state."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcl.data import digits, pipeline, sources
from tests.helpers import digits_config


def _indices(loader, n):
  it = iter(loader)
  return np.stack([next(it)["index"] for _ in range(n)])


def test_loader_order_is_seeded(digits_dir):
  cfg = digits_config(digits_dir)
  make = lambda seed, **kw: pipeline.make_train_loader(  # noqa: E731
      cfg, split="train", global_batch_size=32, seed=seed, **kw
  )
  first = _indices(make(0), 3)
  np.testing.assert_array_equal(first, _indices(make(0), 3))
  assert not np.array_equal(first, _indices(make(1), 3))
  batch = next(iter(make(0)))
  assert set(batch) == {"image", "label", "index", "caption"}
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["caption"].shape == (32,)
  for caption, y in zip(batch["caption"], batch["label"]):
    assert digits.CLASS_NAMES[y] in caption
  # shuffle=False reads the source in order.
  source, _ = sources.build_source(cfg, "train")
  in_order = next(iter(make(0, shuffle=False)))["index"]
  np.testing.assert_array_equal(in_order, [source[i]["index"] for i in range(32)])


def test_loader_one_epoch_and_sharding(digits_dir):
  cfg = digits_config(digits_dir)
  n = 1438
  shards = []
  for index in range(2):
    loader = pipeline.make_train_loader(
        cfg, split="train", global_batch_size=64, seed=5, num_epochs=1,
        shard_options=grain.sharding.ShardOptions(index, 2, drop_remainder=True),
    )
    batches = list(loader)
    assert all(b["image"].shape[0] == 32 for b in batches)  # per-process batch = 64 / 2
    assert len(batches) == (n // 2) // 32  # one epoch of the shard, remainder dropped
    idx = np.concatenate([b["index"] for b in batches])
    assert len(np.unique(idx)) == len(idx)
    shards.append(set(idx.tolist()))
  assert not shards[0] & shards[1]  # each process reads its own examples
  assert pipeline.per_process_batch_size(64, 4) == 16
  with pytest.raises(ValueError, match="divisible by the number of processes \\(3\\)"):
    pipeline.make_train_loader(
        cfg, split="train", global_batch_size=64, seed=0,
        shard_options=grain.sharding.ShardOptions(0, 3, drop_remainder=True),
    )
  with pytest.raises(ValueError, match="global_batch_size"):
    pipeline.make_train_loader(cfg, split="test", global_batch_size=360, seed=0)
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_train_loader(cfg, split="train", global_batch_size=8, seed=-1)
  with pytest.raises(ValueError, match="num_epochs"):
    pipeline.make_train_loader(cfg, split="train", global_batch_size=8, seed=0, num_epochs=0)


def test_iterator_state_resumes_exactly(digits_dir, tmp_path):
  cfg = digits_config(digits_dir)
  loader = pipeline.make_train_loader(cfg, split="train", global_batch_size=16, seed=11)
  it = iter(loader)
  for _ in range(95):  # crosses the first epoch boundary (89 batches per epoch)
    next(it)
  state = pipeline.save_iterator_state(it)
  want = [next(it) for _ in range(3)]
  resumed = pipeline.restore_iterator_state(
      iter(pipeline.make_train_loader(cfg, split="train", global_batch_size=16, seed=11)), state
  )
  for w in want:
    g = next(resumed)
    for key in ("image", "label", "index", "caption"):
      np.testing.assert_array_equal(g[key], w[key])
  # The same through an orbax checkpoint, next to a pytree.
  it = iter(loader)
  for _ in range(4):
    next(it)
  params = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=pipeline.iterator_checkpoint_args(it)))
    mngr.wait_until_finished()
  want = next(it)
  fresh = iter(loader)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(4, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        data=pipeline.iterator_checkpoint_args(fresh, restore=True)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  np.testing.assert_array_equal(next(fresh)["index"], want["index"])
  with pytest.raises(TypeError, match="bytes"):
    pipeline.restore_iterator_state(iter(loader), {"not": "bytes"})
