"""grain training loaders: sharded per JAX process, seeded, checkpointable.

    loader = make_train_loader(data_config, split="train", global_batch_size=256, seed=0)
    it = iter(loader)
    batch = next(it)   # {"image": (b, H, W, C) float32, "label": (b,) int32, "index": (b,) int32,
                       #  "caption": (b,) str array when the data has captions}, b = 256 / processes

Every process reads its own shard (`grain.sharding.ShardByJaxProcess`, contiguous and disjoint) in an
order fixed by `seed` (a new permutation every epoch), so the global batch is the concatenation of the
per-process batches. `it.get_state()` / `it.set_state(state)` resume at exactly the next batch; in an
orbax checkpoint the iterator is one more item of `ocp.args.Composite`:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=iterator_checkpoint_args(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args(it, restore=True)))

(`grain.checkpoint.CheckpointSave/Restore` write one small JSON file per process.)
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from jaxcl.data import digits
from jaxcl.data import sources

_MAX_SEED = 2**32 - 1


class _RedrawCaption(grain.transforms.RandomMap):
  """Re-draws the caption template of every example from the record's seeded rng (digits data)."""

  def __init__(self, templates: tuple[str, ...], class_names: tuple[str, ...]):
    self.templates = tuple(templates)
    self.class_names = tuple(class_names)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    element = dict(element)
    element["caption"] = digits.captions_for_labels(
        [int(element["label"])], rng, self.templates, self.class_names
    )[0]
    return element


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  out = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    out[key] = np.asarray(values, dtype=str) if isinstance(values[0], str) else np.stack(values)
  return out


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside `absl.app.run` (scripts, notebooks) use defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """global_batch_size / process_count, an error when it does not divide.

  >>> per_process_batch_size(256, 4)
  64
  """
  if not _is_int(global_batch_size):
    raise TypeError(f"`global_batch_size` must be an integer, got {global_batch_size!r}.")
  process_count = jax.process_count() if process_count is None else int(process_count)
  if global_batch_size < 1:
    raise ValueError(f"`global_batch_size` must be >= 1, got {global_batch_size}.")
  if global_batch_size % process_count:
    raise ValueError(
        f"`global_batch_size` must be divisible by the number of processes ({process_count}), "
        f"got {global_batch_size}."
    )
  return int(global_batch_size) // process_count


def make_train_loader(
    data_config: Any,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> grain.DataLoader:
  """A grain DataLoader of per-process batches (dicts of NumPy arrays), remainders dropped.

  Args:
    data_config: see `jaxcl.data.sources` (name, data_dir, tfds_name, folder, captions_file,
      image_size).
    split: the split to read ("train", "test", a tfds slice such as "train[:90%]").
    global_batch_size: examples per step over all processes; each process gets
      global_batch_size / jax.process_count().
    seed: 32-bit seed of the order (and of per-record randomness such as digits caption templates).
    num_epochs: None repeats forever; else stop after that many passes over the shard.
    shuffle: permute every epoch (else read in order).
    worker_count: grain worker processes (0 reads in this process; > 0 needs a `__main__` guard);
      None takes `data_config.worker_count` (0 when absent).
    shard_options: override the per-process sharding (default
      `grain.sharding.ShardByJaxProcess(drop_remainder=True)`; tests use explicit shards).
  Returns:
    A `grain.DataLoader`; `iter(loader)` supports `get_state()` / `set_state()`.

  >>> import tempfile
  >>> cfg = sources.default_data_config("digits")
  >>> tmp = tempfile.TemporaryDirectory()
  >>> cfg.data_dir = tmp.name
  >>> batch = next(iter(make_train_loader(cfg, split="train", global_batch_size=4, seed=0)))
  >>> batch["image"].shape, batch["label"].dtype, batch["caption"].shape
  ((4, 8, 8, 1), dtype('int32'), (4,))
  >>> tmp.cleanup()
  """
  if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
    raise ValueError(f"`seed` must be an integer in [0, 2**32 - 1], got {seed!r}.")
  if num_epochs is not None and (not _is_int(num_epochs) or num_epochs < 1):
    raise ValueError(f"`num_epochs` must be None or an integer >= 1, got {num_epochs!r}.")
  if worker_count is None:
    worker_count = sources.config_value(data_config, "worker_count", 0)
  if not _is_int(worker_count) or worker_count < 0:
    raise ValueError(
        f"`worker_count` (data_config.worker_count) must be an integer >= 0, got {worker_count!r}."
    )
  if worker_count > 0:
    _ensure_absl_flags_parsed()
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  batch_size = per_process_batch_size(global_batch_size, shard_options.shard_count)
  source, info = sources.build_source(data_config, split)
  per_shard = len(source) // shard_options.shard_count
  if batch_size > per_shard:
    raise ValueError(
        f"`global_batch_size` {global_batch_size} needs {batch_size} examples per process, but "
        f"split {split!r} has {len(source)} examples ({per_shard} per process over "
        f"{shard_options.shard_count} processes)."
    )
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=shard_options,
      shuffle=shuffle,
      num_epochs=num_epochs,
      seed=int(seed),
  )
  operations = []
  if info.captions_from_labels:
    operations.append(_RedrawCaption(info.caption_templates, info.class_names))
  operations.append(grain.transforms.Batch(batch_size, drop_remainder=True, batch_fn=_stack))
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=operations,
      worker_count=int(worker_count),
      shard_options=shard_options,
  )


def save_iterator_state(it: grain.DataLoaderIterator) -> bytes:
  """The iterator position as bytes (JSON): where `restore_iterator_state` resumes."""
  if not hasattr(it, "get_state"):
    raise TypeError(f"`it` must be a grain iterator (iter(loader)), got {type(it).__name__}.")
  return it.get_state()


def restore_iterator_state(it: grain.DataLoaderIterator, state: bytes) -> grain.DataLoaderIterator:
  """Moves `it` (an iterator of the same loader configuration) to a saved position; returns it."""
  if not hasattr(it, "set_state"):
    raise TypeError(f"`it` must be a grain iterator (iter(loader)), got {type(it).__name__}.")
  if not isinstance(state, (bytes, bytearray)):
    raise TypeError(
        f"`state` must be the bytes of `save_iterator_state`, got {type(state).__name__}."
    )
  it.set_state(bytes(state))
  return it


def iterator_checkpoint_args(it: grain.DataLoaderIterator, *, restore: bool = False):
  """The orbax args for the data iterator in an `ocp.args.Composite` (save, or restore into `it`).

  Restoring moves `it` in place to the saved position (one JSON file per process in the checkpoint).
  """
  if not hasattr(it, "get_state"):
    raise TypeError(f"`it` must be a grain iterator (iter(loader)), got {type(it).__name__}.")
  from grain import checkpoint  # pylint: disable=import-outside-toplevel

  return checkpoint.CheckpointRestore(it) if restore else checkpoint.CheckpointSave(it)
