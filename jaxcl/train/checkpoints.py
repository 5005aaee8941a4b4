"""What a saved checkpoint holds, read from orbax's metadata without reading any array.

- `shape_mismatches(manager, step, target)`: the arrays whose saved shape differs from the run's. The
  trainer (`loop.restore_checkpoint`) and MCL's earlier stages (`mcl.load_stage_variables`) check it
  before they restore: orbax's own reads of a wrong-shaped array fail one by one, with an error that does
  not name the array, and leave failed reads behind in its event loop.
"""

from __future__ import annotations

import jax


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
