"""Device-varying types under `jax.shard_map` (check_vma): loop carries must vary like their inputs."""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
  """The mesh axes along which x varies inside `shard_map` (empty outside it, or for a replicated x)."""
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(getattr(mat, "varying", ()))


def cast_varying(x, axes):
  """x marked as varying along every axis in `axes` (a no-op for those it already varies along)."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return lax.pcast(x, missing, to="varying") if missing else x


def like(tree, *refs):
  """Each leaf of `tree` (a loop's initial carry) cast to vary along every axis any of `refs` varies
  along, so that `fori_loop`/`scan` bodies mixing them type-check under `shard_map`."""
  axes = frozenset().union(*(varying_axes(r) for r in jax.tree.leaves(refs)))
  if not axes:
    return tree
  ordered = tuple(sorted(axes, key=str))
  return jax.tree.map(lambda x: cast_varying(x, ordered), tree)


def kernel_io(inputs, out_shape):
  """The inputs and `out_shape` (ShapeDtypeStructs) of a `pallas_call`, typed for `shard_map`:

  every input cast to vary along the union of the inputs' varying axes, and every output declared
  varying along them too (`manual_axis_type`), as check_vma requires of a call whose result differs
  per device. Outside `shard_map` both come back unchanged."""
  axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(inputs)))
  if not axes:
    return inputs, out_shape
  inputs = like(inputs, *inputs)
  mat = jax.typeof(jax.tree.leaves(inputs)[0]).mat
  out_shape = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape
  )
  return inputs, out_shape
