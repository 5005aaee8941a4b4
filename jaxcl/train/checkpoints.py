"""Checkpoints: the train state and the data iterator saved together, restored from the newest good one.

- `checkpoint_manager`, `save_checkpoint`, `restore_checkpoint` (falls back to older checkpoints when
  the newest is unreadable or holds non-finite values; `quarantine_checkpoint` moves those aside).
- `shape_mismatches(manager, step, target)`: the arrays whose saved shape differs from the run's. The
  trainer (`restore_checkpoint`) and MCL's earlier stages (`mcl.load_stage_variables`) check it
  before they restore: orbax's own reads of a wrong-shaped array fail one by one, with an error that does
  not name the array, and leave failed reads behind in its event loop.
"""

from __future__ import annotations

import time

import jax
import orbax.checkpoint as ocp

from jaxcl import _paths
from jaxcl.train import finite
from jaxcl.train import workdir as workdir_lib


def shape_mismatches(manager, step: int, target, item: str = "state") -> list[str]:
  """"path: saved (a, b), this config (c, d)" for every array of `target` (a pytree of arrays or
  `jax.ShapeDtypeStruct`s) whose shape in item `item` of the checkpoint of `step` differs; [] when they
  agree, or when the metadata cannot be read or matched (the restore then says what is wrong).
  Paths are matched by their key names ("params/Dense_0/kernel"), so a subtree such as
  {"params", "batch_stats"} is checked against the whole saved state."""
  try:
    saved = manager.item_metadata(step)[item]
  except Exception:  # pylint: disable=broad-except
    return []
  shapes = {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved) if hasattr(m, "shape")}
  named = ((_name(p), t) for p, t in jax.tree_util.tree_leaves_with_path(target))
  return [f"{name}: saved {shapes[name]}, this config {tuple(t.shape)}"
          for name, t in named if name in shapes and shapes[name] != tuple(t.shape)]


def summary(mismatches: list[str], shown: int = 3) -> str:
  """The first `shown` of `shape_mismatches`' lines joined, and how many more there are."""
  more = len(mismatches) - shown
  return "; ".join(mismatches[:shown]) + (f"; and {more} more" if more > 0 else "")


def _name(path) -> str:
  """"params/Dense_0/kernel": the path as the loop names leaves elsewhere (`keystr`, simple, "/")."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


class DataState:
  """A data iterator's state (`get_state()`) at one moment, saved as the iterator itself would be:
  the loop has already taken the next batch (prefetch) when it saves the state after the last one a
  saved step consumed."""

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return self._state


# ------------------------------------------------------------------------------------------ checkpoint
# Orbax saves a replicated array "replica-parallel": each replica writes a slice, cut out on its device
# by an eager jax slice (one dispatch, and one compile per shape, per array and replica). For small
# arrays that costs more than it saves (a tiny CLIP run's two saves on 8 CPU devices: 1,440 slices,
# 112 compiles; the run took 25.2 s with them, 18.6 s without); an array whose slices would be smaller
# than this is written whole by one replica. Big arrays (a ViT's weights on a pod) still save in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def use_replica_parallel_saves_for_big_arrays_only() -> None:
  """Registers orbax's `jax.Array` handler with `min_slice_bytes_for_replica_parallel` =
  `MIN_REPLICA_SLICE_BYTES` (orbax's global handler registry is where this option lives; the default
  handler's other settings, including its array metadata store, are kept)."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  store = getattr(default, "_array_metadata_store", None)  # orbax's default: a Store()
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, array_metadata_store=store), override=True)


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
  import grain

  use_replica_parallel_saves_for_big_arrays_only()

  # Each step is written to a temporary directory and renamed when complete, so a process killed in
  # the middle of a write leaves no step that all_steps() lists; cleanup_tmp_directories removes such
  # leftovers when the next run starts.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(config.keep_checkpoints), create=True,
      enable_async_checkpointing=bool(config.async_checkpointing),
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
      _paths.as_path(workdir) / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
  )


def save_checkpoint(manager, step: int, state, data_iter) -> None:
  """Saves `state` and the data iterator's state (`data_iter.get_state()`: the iterator, or a
  `DataState` taken after the last batch the saved step consumed) as step `step`."""
  import grain

  saved = manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)
  if not saved:
    raise RuntimeError(f"orbax did not save the checkpoint of step {step} in {manager.directory}.")


def restore_checkpoint(manager, abstract_state, shardings, data_iter) -> tuple[object | None, int]:
  """Restores the newest good checkpoint, falling back to older ones; (None, 0) if there is none.

  Good: orbax reads it into this config's state, and every floating leaf of the state is finite
  (`nonfinite_leaves`; the parameters, the optimizer state, ...). The unreadable or non-finite newer
  checkpoints are moved to workdir/checkpoints_quarantine (`quarantine_checkpoint`), never deleted: a
  transient read error must not destroy a good checkpoint. When none is good nothing is moved and a
  RuntimeError lists why each failed.
  """
  import grain

  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  steps = sorted(manager.all_steps(), reverse=True)
  errors = {}
  for step in steps:
    other = shape_mismatches(manager, step, target)
    if other:  # not read at all (orbax's reads would fail one by one)
      restored = None
      errors[step] = f"holds arrays of other shapes than this config's ({summary(other)})"
    else:
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # pylint: disable=broad-except
        restored, errors[step] = None, f"is unreadable ({type(e).__name__}: {e})"
    if not workdir_lib.every_process(restored is not None):  # every process resumes from the same step
      errors.setdefault(step, "is unreadable on another process (its output says why)")
      print(f"warning: checkpoint at step {step} {errors[step]}; trying an older one")
      continue
    bad = finite.nonfinite_leaves(restored["state"])
    if bad:
      shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
      errors[step] = f"holds non-finite values (NaN or inf in {len(bad)} array(s): {shown})"
      print(f"warning: checkpoint at step {step} {errors[step]}; trying an older one")
      continue
    for newer in steps:  # orbax never saves at or below its latest step: move the bad ones aside
      if newer > step:
        moved = quarantine_checkpoint(manager, newer)
        print(f"warning: moved the checkpoint of step {newer}, which {errors[newer]}, to {moved}; "
              f"resuming from step {step}")
    return restored["state"], step
  if steps:
    raise RuntimeError(
        f"none of the checkpoints {sorted(steps)} in {manager.directory} can be restored into this "
        "config (a changed model or optimizer setting?). Use another --workdir or remove them.\n"
        + "\n".join(f"step {s} {why}" for s, why in errors.items()))
  return None, 0


def quarantine_checkpoint(manager, step: int) -> str:
  """Moves the checkpoint of `step` out of `manager`'s folder (workdir/checkpoints) to
  workdir/checkpoints_quarantine/<step>-<UTC time>, and returns that path (on an object store the
  folder also gets a README.txt: a folder there exists only once an object lies in it).

  The manager is reloaded, so the step leaves its step list (and `keep_checkpoints` counts only the
  steps still there). Several processes: the first moves it, all wait for the move, then reload.
  """
  source = _paths.as_path(manager.directory) / str(step)
  folder = _paths.as_path(manager.directory).parent / "checkpoints_quarantine"
  moved = folder / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  error = None
  if jax.process_index() == 0:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      if not _paths.is_local(folder):  # an object store's folder exists once an object lies in it
        (folder / "README.txt").write_text("Checkpoints jaxcl moved aside as unreadable or non-finite; "
                                           "move one back into checkpoints/ to use it again.\n")
      suffix, base = 1, str(moved)
      while moved.exists():  # the same step quarantined twice within one second
        moved, suffix = _paths.as_path(f"{base}.{suffix}"), suffix + 1
      source.rename(moved)
    except OSError as e:
      error = e
  if not workdir_lib.every_process(error is None):  # all wait for the move, and all fail if it failed
    raise RuntimeError(f"could not move the checkpoint {source} aside to {moved}: "
                       f"{error or 'see process 0'}") from error
  manager.reload()
  return str(moved)
