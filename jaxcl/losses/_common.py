"""Helpers shared by the loss modules: L2 normalisation, temperatures, positive logits, label ids and
multi-view rows, and the global batch when it is split over devices (ids, sums, means, `shardable`)."""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcl import _checks
from jaxcl.ops import masks
from jaxcl.ops import sharded
from jaxcl.ops.engines import SHARDED_IMPLS

NORM_EPS = 1e-6


@functools.partial(jax.jit, static_argnames=("axis", "eps"))  # called eagerly, one program, not ten
def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """x / max(‖x‖₂, eps), computed in float32 and returned in x's dtype (gradients flow through).

  With m = max_i |x_i|, s = √m and u = (x / s) / s (so |u_i| <= 1 and ‖u‖ is in [1, √D]: squaring
  cannot overflow or underflow, for any row up to float32's maximum):

      x / max(‖x‖, eps) = u / ‖u‖        if m ‖u‖ >= eps (that is ‖x‖ >= eps)
                        = u · s² / eps   otherwise (a row shorter than eps is scaled by 1/eps)

  Dividing twice by s, not once by m, keeps every reciprocal a normal float32 number (1/m is subnormal,
  flushed to 0, beyond m ≈ 1e38, and XLA divides by multiplying with the reciprocal). Only (B, 1)
  factors multiply the rows. A zero row stays zero with a finite gradient; rows of subnormal numbers
  are zero where the hardware flushes subnormals to zero (XLA on CPU, GPU and TPU).
  """
  x32 = x.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x32), axis=axis, keepdims=True, initial=0.0))
  s = jax.lax.stop_gradient(jnp.sqrt(jnp.where(m > 0, m, 1.0)))  # the result does not depend on s
  u = x32 / s / s
  sq = jnp.sum(jnp.square(u), axis=axis, keepdims=True)  # about 1 or more unless x = 0
  norm_u = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))  # finite gradient at x = 0
  factor = jnp.where(m * norm_u >= eps, 1.0 / norm_u, s * s / eps)  # x = 0: s = 1, factor 1/eps
  return (u * factor).astype(x.dtype)


def maybe_normalize(x: jax.Array, normalize: bool) -> jax.Array:
  return l2_normalize(x) if normalize else x


def embeddings(name: str, x, *, normalize: bool = True, min_batch: int = 2, why: str = "") -> jax.Array:
  """Validates a (B, D) float embedding batch and L2-normalises it if asked."""
  x = _checks.check_array(name, x, ndim=2)
  if min_batch:
    _checks.check_min_batch(name, x, min_batch, why=why or "a contrastive loss needs a negative")
  return maybe_normalize(x, normalize)


def pair(name_a: str, a, name_b: str, b, *, normalize: bool = True, why: str = "", axis_name=None):
  """Validates two (B, D) batches of the same shape and L2-normalises them if asked. Under `axis_name`
  they are one device's shards and the GLOBAL batch needs two examples."""
  a = _checks.check_array(name_a, a, ndim=2)
  b = _checks.check_array(name_b, b, ndim=2)
  _checks.check_same_shape(name_a, a, name_b, b)
  check_global_batch(name_a, a, 2, axis_name, why=why or "a contrastive loss needs a negative")
  return maybe_normalize(a, normalize), maybe_normalize(b, normalize)


def inverse_temperature(temperature, name: str = "temperature") -> jax.Array:
  """1 / temperature as a float32 scalar, after checking the shape (() or (1,)) and that a concrete
  temperature is positive with 1/temperature <= `_checks.MAX_SCALE`."""
  _checks.check_temperature(name, temperature)
  return 1.0 / _checks.check_scalar(name, temperature)


def logit_scale(value, name: str = "logit_scale") -> jax.Array:
  """A multiplier of cosines as a float32 scalar, after checking the shape (() or (1,)) and that a
  concrete value is positive and <= `_checks.MAX_SCALE`."""
  _checks.check_scale(name, value)
  return _checks.check_scalar(name, value)


def logit_bias(value, name: str = "logit_bias") -> jax.Array:
  """An additive logit bias as a float32 scalar, after checking the shape (() or (1,)) and that a
  concrete value is finite with |value| <= `_checks.MAX_SCALE`."""
  _checks.check_bias(name, value)
  return _checks.check_scalar(name, value)


def rowwise_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """<a_i, b_i> per row, float32 accumulation."""
  return jnp.einsum("id,id->i", a, b, preferred_element_type=jnp.float32)


def _shown_argument(value) -> str:
  if isinstance(value, (bool, int, float, str)) or value is None:
    return repr(value)
  return f"<{type(value).__name__} of shape {tuple(jnp.shape(value))}>"


def keyword_only(loss):
  """Turns a call with too many positional arguments, e.g. `clip(a, b, 10.)`, into a TypeError that
  names the loss and the keyword: "clip() takes 2 positional arguments (image, text); pass
  logit_scale=10.0 by keyword" (the extra values are matched to the keyword-only parameters in order).
  Put it above every other decorator of a public loss."""
  params = inspect.signature(loss).parameters.values()
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return loss  # takes any number of positional arguments

  @functools.wraps(loss)
  def wrapper(*args, **kwargs):
    if len(args) > len(positional):
      extra = args[len(positional):]
      if len(extra) <= len(keywords):
        hint = ", ".join(f"{k}={_shown_argument(v)}" for k, v in zip(keywords, extra))
        hint = f"; pass {hint} by keyword"
      else:
        hint = f"; the others are keyword-only ({', '.join(keywords)})" if keywords else ""
      raise TypeError(
          f"{loss.__name__}() takes {len(positional)} positional arguments ({', '.join(positional)}), "
          f"got {len(args)}{hint}."
      )
    return loss(*args, **kwargs)

  return wrapper


# ------------------------------------------------------------------------------ reduction and mask
REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, *, per_anchor: bool = True) -> None:
  """`reduction` is "mean", "sum" or "none"; only "mean" for a loss without per-anchor terms (a log of
  a mean over pairs, a loss on batch statistics)."""
  if per_anchor:
    _checks.check_choice("reduction", reduction, REDUCTIONS)
  elif reduction != "mean":
    raise ValueError(
        f"`reduction` must be 'mean' for this loss (it has no per-sample decomposition), got {reduction!r}."
    )


def sample_mask(mask, n: int, name: str = "mask") -> jax.Array | None:
  """None, or the bool (n,) per-sample mask of a padded batch (True: a real sample)."""
  return masks.check_validity(name, mask, n)


def zero_invalid(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """x where valid, else 0: a masked row's -inf (nothing to contrast) never enters arithmetic."""
  return x if valid is None else jnp.where(valid, x, 0.0)


def reduce_loss(per_anchor: jax.Array, reduction: str, valid: jax.Array | None = None, axis_name=None):
  """Reduces the per-anchor losses ℓ_a over the anchors a that are `valid` (all when None):

      "none": ℓ_a, 0 where not valid (this device's anchors under `axis_name`)
      "sum":  Σ_{a valid} ℓ_a                       (over the global batch)
      "mean": Σ_{a valid} ℓ_a / #{a valid}          (0 when no anchor is valid)

  ℓ_a of an invalid anchor may be ±inf (a row with nothing to contrast): it is replaced by 0 before
  any arithmetic, so neither the value nor the gradients see it.
  """
  x = zero_invalid(per_anchor, valid)
  if reduction == "none":
    return x
  total = batch_sum(x, axis_name)
  if reduction == "sum":
    return total
  if valid is None:
    return total / global_size(x.size, axis_name)
  return total / jnp.maximum(batch_sum(valid.astype(jnp.float32), axis_name), 1.0)


# ------------------------------------------------------------------- label ids and multi-view rows
def compact_ids(labels: jax.Array) -> jax.Array:
  """Compact ids in [0, n): the position of each label's first occurrence among the sorted labels.

  Equal labels get equal ids and different labels different ids, whatever the label values (negative,
  large, sparse), with static shapes so it works under `jit`.
  """
  return jnp.searchsorted(jnp.sort(labels), labels, side="left").astype(jnp.int32)


def views_to_rows(name: str, features, labels, axis_name=None):
  """(N, D) or (N, V, D) features -> (N·V, D) view-major rows, the (N,) labels checked, and V. Under
  `axis_name` the features are one device's shards and the global batch needs two samples."""
  features = _checks.check_array(name, features, ndim=(2, 3))
  n = features.shape[0]
  check_global_batch(name, features, 2, axis_name, why="a contrastive loss needs a negative")
  labels = _checks.check_labels("labels", labels, n)
  views = 1 if features.ndim == 2 else features.shape[1]
  z = jnp.reshape(jnp.swapaxes(features, 0, 1), (-1, features.shape[-1])) if views > 1 else features
  return z, labels, views


def segment_stats(z32: jax.Array, ids: jax.Array, valid: jax.Array | None = None):
  """Per row: Σ of the valid rows sharing its id (including itself) and how many there are."""
  m = z32.shape[0]
  ones = jnp.ones((m,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  total = jax.ops.segment_sum(zero_invalid(z32, None if valid is None else valid[:, None]), ids,
                              num_segments=m)[ids]
  count = jax.ops.segment_sum(ones, ids, num_segments=m)[ids]
  return total, count


def row_mask(mask, n: int, views: int):
  """The (N,) sample mask checked, and tiled over the views of the view-major rows (None: no mask)."""
  mask = sample_mask(mask, n)
  return mask, None if mask is None else jnp.tile(mask, views)


def and_valid(a: jax.Array, valid: jax.Array | None) -> jax.Array:
  """a & valid, or a when there is no mask (valid None)."""
  return a if valid is None else a & valid


# --------------------------------------------------------------------------- batches split over devices
def check_global_batch(name: str, x: jax.Array, minimum: int, axis_name, why: str = "") -> None:
  """At least `minimum` examples along axis 0 of x, counted over the global batch under `axis_name`
  (x is then one device's shard: one row per device is enough on two devices)."""
  if axis_name is None:
    _checks.check_min_batch(name, x, minimum, why=why)
    return
  n_devices = sharded.axis_size(axis_name)
  if x.shape[0] * n_devices < minimum:
    reason = f" ({why})" if why else ""
    raise ValueError(
        f"`{name}` needs at least {minimum} examples in the global batch{reason}, got {x.shape[0]} per "
        f"device on {n_devices} devices along `axis_name={axis_name!r}` (local shape {x.shape})."
    )


def batch_ids(n_local: int, axis_name) -> jax.Array:
  """Global positions of the local rows: arange(n) on one device, axis_index · n + arange(n) under an
  axis name (so id masks compare rows of different devices correctly)."""
  if axis_name is None:
    return jnp.arange(n_local, dtype=jnp.int32)
  return sharded.global_ids(n_local, axis_name)


def global_size(n_local: int, axis_name) -> int:
  """The global batch size: n_local times the number of devices along `axis_name`."""
  return n_local if axis_name is None else n_local * sharded.axis_size(axis_name)


def gather_batch(x: jax.Array | None, axis_name, axis: int = 0) -> jax.Array | None:
  """The global batch from this device's shard x: x itself when `axis_name` is None, else every
  device's shard concatenated along `axis` in device order (`lax.all_gather(tiled=True)`,
  differentiable: the cotangents of the other devices' rows are sent back to them). None stays None."""
  if x is None or axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def batch_sum(x: jax.Array, axis_name) -> jax.Array:
  """Σ over every element of x on every device."""
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def batch_sum_rows(x: jax.Array, axis_name) -> jax.Array:
  """Σ over the rows (axis 0) of x on every device: the column sums of the global batch."""
  total = jnp.sum(x, axis=0)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def batch_mean(x: jax.Array, axis_name) -> jax.Array:
  """The mean over the global batch of the per-row values x (same length on every device)."""
  return batch_sum(x, axis_name) / global_size(x.size, axis_name)


def batch_logsumexp(x: jax.Array, axis_name) -> jax.Array:
  """log Σ exp(x) over the global batch (a scalar)."""
  lse = jax.nn.logsumexp(x)
  if axis_name is None:
    return lse
  return sharded.combine_logsumexp(lse[None], axis_name, scatter=False)[0]


def _axis_bound(axis_name) -> bool:
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    return False
  return True


def shardable(*batch_args: str, batch_axis: dict[str, int] | None = None, split_output: bool = True,
              out_specs=None):
  """Lets a loss run on globally sharded arrays as well as inside the user's `shard_map`.

  The decorated loss takes `impl` and `axis_name=None`; the decorator adds `mesh=None` to its signature
  (after `axis_name`) and consumes it. It runs as written (on local
  arrays) when `axis_name` is None and `impl` is a single-device engine, or when `axis_name` is a mesh
  axis bound by an enclosing `jax.shard_map` (the inputs are then this device's shards). Otherwise (a
  sharded `impl` "allgather"/"ring", or a `mesh`, with no enclosing shard_map) the arguments named in
  `batch_args` are taken as global arrays whose leading (batch) axis is split over the mesh axis
  `axis_name` (default "data") of `mesh` (default: the mesh set by `jax.set_mesh`), and the loss runs
  under `jax.shard_map` over that axis; other array arguments (a learnable temperature) are replicated.
  With `reduction="none"` the per-anchor losses come back split like the batch (each device's anchors
  in turn: for a two-view loss [z1; z2] of device 0, then of device 1, ...).

  `impl="auto"` with neither `axis_name` nor `mesh` takes the sharded path by itself when the batch is
  split over more than one device (`auto_batch_axes`), so a loss on batch-sharded global arrays under
  `jax.set_mesh` never builds the global (B, B) similarity matrix on one device.

  What may be split and how:
  - a batch argument may be the loss's `*args` or a tuple of arrays (an id pair): each array is split
    alike; given as a scalar (a per-row value given once for every row) it is replicated;
  - `batch_axis` names the arguments whose batch axis is not the leading one ({"views": 1} for (V, B, D)
    views);
  - a non-batch argument that is a pytree of arrays (a state, a parameter dict) is replicated;
  - `split_output=False`: the loss's output is the same on every device for every `reduction` (the
    batch arguments are not the anchors, e.g. sharded class centres), so "none" comes back whole;
  - `out_specs`, for a loss that returns more than a loss (a NamedTuple with a state, per-sample codes):
    a function `(batch_spec, reduction) -> PartitionSpec pytree prefix of the output`, batch_spec being
    `PartitionSpec(axis_name)`; by default the output is `batch_spec` for `reduction="none"` (with
    `split_output`), else replicated.
  """
  batch_axis = dict(batch_axis or {})

  def wrap(loss):
    inner = inspect.signature(loss)
    params = list(inner.parameters.values())
    if "mesh" in inner.parameters or "axis_name" not in inner.parameters:
      raise TypeError(f"@shardable adds `mesh` after `axis_name`: {loss.__name__} must declare `axis_name` "
                      "and not `mesh`.")
    params.insert([p.name for p in params].index("axis_name") + 1, inspect.Parameter(
        "mesh", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="jax.sharding.Mesh | None"))
    signature = inner.replace(parameters=params)

    def call(a: dict):
      bound = inspect.BoundArguments(inner, {name: value for name, value in a.items() if name != "mesh"})
      return loss(*bound.args, **bound.kwargs)  # (positionally where the loss takes `*args`)

    def batch_values(a: dict):
      """[(array or None, its batch axis)] of the batch arguments, a `*args` tuple unpacked."""
      out = []
      for name in batch_args:
        value = a[name]
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
          out.append((v, batch_axis.get(name, 0)))
      return out

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
      arguments = signature.bind(*args, **kwargs)
      arguments.apply_defaults()
      a = dict(arguments.arguments)
      axis_name, mesh, impl = a["axis_name"], a["mesh"], a["impl"]
      if mesh is None and axis_name is None and impl == "auto":
        values = batch_values(a)
        axes = auto_batch_axes(*(v for v, _ in values), batch_axes=tuple(k for _, k in values))
        if axes is not None:
          a["axis_name"] = axes if len(axes) > 1 else axes[0]
          return _under_shard_map(call, a, batch_args, batch_axis, split_output, out_specs)
        return call(a)
      if mesh is None and (
          (axis_name is None and impl not in SHARDED_IMPLS)
          or (axis_name is not None and _axis_bound(axis_name))
      ):
        return call(a)
      if impl == "auto" and mesh is not None and not _divides(
          mesh, "data" if axis_name is None else axis_name, batch_values(a)):
        return call(dict(a, axis_name=None))  # auto: a batch that does not split evenly
      return _under_shard_map(call, a, batch_args, batch_axis, split_output, out_specs)

    wrapper.__signature__ = signature  # the loss's parameters and `mesh`, which the wrapper consumes
    return wrapper

  return wrap


def auto_batch_axes(x, *others, batch_axes: tuple[int, ...] | None = None) -> tuple[str, ...] | None:
  """The mesh axes `impl="auto"` splits a loss over, or None (run on one device, GSPMD partitions it).

  With the mesh set by `jax.set_mesh` (axes not already manual, i.e. outside `shard_map`): the axes the
  batch dimension of the global batch array `x` is sharded over when its type says so (Explicit mesh
  axes), else the mesh's "data" axis if it has one; None when those axes hold a single device, when
  the batch size of x or of one of the `others` batch arguments (None: absent) is not a multiple of
  their device count, or without a mesh. `batch_axes[i]`: the batch axis of (x, *others)[i] (the
  leading one where not given).
  """
  batch_axes = tuple(batch_axes or ()) + (0,) * (1 + len(others) - len(batch_axes or ()))  # 0 where not given
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x is None or jnp.ndim(x) <= batch_axes[0]:
    return None
  free = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
          if kind != jax.sharding.AxisType.Manual]
  try:
    sharding = getattr(jax.typeof(x), "sharding", None)
  except TypeError:  # not an array type (a list): no sharding to read
    sharding = None
  spec = getattr(sharding, "spec", None)
  if spec is not None and len(spec) and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    lead = spec[batch_axes[0]] if len(spec) > batch_axes[0] else None
    axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
  else:
    axes = ("data",) if "data" in free else ()
  axes = tuple(a for a in axes if a in free)
  if math.prod(mesh.shape[a] for a in axes) <= 1 or not _divides(
      mesh, axes, list(zip((x,) + others, batch_axes))):
    return None
  return axes


def _divides(mesh, axis_name, values) -> bool:
  """Whether every array in `values`, (array or None (absent), its batch axis) pairs, has a batch size
  that splits evenly over the devices of mesh axis (or axes) `axis_name` (True for an axis the mesh
  lacks: `_under_shard_map` reports that)."""
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if any(a not in mesh.axis_names for a in axes):
    return True
  n_devices = math.prod(mesh.shape[a] for a in axes)
  return all(v is None or jnp.ndim(v) == 0 or (jnp.ndim(v) > k and jnp.shape(v)[k] % n_devices == 0)
             for v, k in values)


def _is_array_tree(value) -> bool:
  """A jax.Array, or a pytree (a NamedTuple state, a dict of parameters) whose leaves all are."""
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


def _under_shard_map(call, a: dict, batch_args: tuple[str, ...], batch_axis: dict[str, int],
                     split_output: bool = True, out_specs=None):
  """`call(arguments)` under `jax.shard_map` over the mesh axes `a["axis_name"]`, the `batch_args`
  split along their batch axis (`batch_axis`, default the leading one; each array of a `*args` tuple
  or of an id-pair tuple alike), other arrays and pytrees of arrays replicated; the output split by
  `out_specs(batch_spec, reduction)` (see `shardable`)."""
  axis_name = a["axis_name"] if a["axis_name"] is not None else "data"
  mesh = a["mesh"] if a["mesh"] is not None else jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(
        f"`impl={a['impl']!r}` on global arrays needs a device mesh: pass `mesh=` or call inside "
        "`with jax.set_mesh(mesh):` (or call the loss inside your own `jax.shard_map` with `axis_name`)."
    )
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  for axis in axes:
    if axis not in mesh.axis_names:
      raise ValueError(f"`axis_name` {axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}.")
  n_devices = math.prod(mesh.shape[axis] for axis in axes)
  names, values, specs = [], [], []  # names: (argument, index in its `*args` tuple or None)
  for name, value in a.items():
    if name in batch_args and isinstance(value, (tuple, list)):
      items = [(f"{name}[{k}]", (name, k), v) for k, v in enumerate(value)]
    else:
      items = [(name, (name, None), value)]
    for shown, slot, value in items:
      if name in batch_args and value is not None and jnp.ndim(value) > 0:
        _checks.check_int32(shown, value)  # before jnp.asarray wraps values beyond int32
        value = jnp.asarray(value)
        axis = batch_axis.get(name, 0)
        if value.ndim <= axis or value.shape[axis] % n_devices:
          which = "leading (batch)" if axis == 0 else f"batch (axis {axis})"
          raise ValueError(
              f"`{shown}` of shape {value.shape} cannot be split over {n_devices} devices along mesh axis "
              f"{axis_name!r}: its {which} size must be a multiple of {n_devices}."
          )
        names.append(slot), values.append(value), specs.append(PartitionSpec(*([None] * axis), axis_name))
      elif _is_array_tree(value):
        names.append(slot), values.append(value), specs.append(PartitionSpec())
  static = {name: value for name, value in a.items() if (name, None) not in names
            and not (name in batch_args and isinstance(value, (tuple, list)))}
  static["axis_name"] = axis_name  # (`call` drops `mesh`: inside, the loss sees this device's shards)
  if static["impl"] not in SHARDED_IMPLS + ("auto",):
    raise ValueError(
        f"`impl` must be one of {SHARDED_IMPLS + ('auto',)} for a loss over a mesh, got "
        f"{static['impl']!r} (for the GSPMD-partitioned dense loss, call it with impl='dense' and no mesh)."
    )

  def local(*local_values):
    shards = dict(static)
    for (name, k), value in zip(names, local_values):
      if k is None:
        shards[name] = value
      else:  # one array of a `*args` tuple
        shards[name] = shards.get(name, ()) + (value,)
    return call(shards)

  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # (`jax.make_mesh`'s default) shard_map takes Explicit-axis arrays as they are sharded: put each
    # on its spec first (a no-op for an array already sharded so).
    values = [jax.tree.map(lambda x, spec=spec: jax.sharding.reshard(
        x, spec if isinstance(mesh, jax.sharding.AbstractMesh) else jax.sharding.NamedSharding(mesh, spec)), v)
              for v, spec in zip(values, specs)]
  # reduction="none": each device returns its own anchors' losses, concatenated along the batch axis.
  batch_spec = PartitionSpec(axis_name)
  if out_specs is not None:
    out_spec = out_specs(batch_spec, a.get("reduction"))
  else:
    out_spec = batch_spec if split_output and a.get("reduction") == "none" else PartitionSpec()
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=out_spec)(*values)
