"""Multi-view contrastive losses with one term per instance: MV-InfoNCE and MV-DHEL.

"A Principled Framework for Multi-View Contrastive Learning" (Koromilas et al., 2025). With V views of
each of B instances, u_{i,l} the (L2-normalised) embedding of view l of instance i and
s(u, v) = <u, v> / τ, both losses share the alignment term, the log-sum over *all ordered pairs* of
different views of the same instance:

    pos_i = log Σ_{l} Σ_{m ≠ l} exp s(u_{i,l}, u_{i,m})

and differ in the energy (denominator). The pos_i term only needs the B·V² same-instance dot products
(a per-instance V×V Gram matrix), never the (VB)² similarity matrix; the denominators are
`jaxcl.ops.logsumexp` reductions, so every engine applies, and with `axis_name=` / `mesh=` the
instances (axis 1 of the views) split over devices, on the sharded engines "allgather" and "ring".

| paper | function | engines |
|---|---|---|
| A Principled Framework for Multi-View Contrastive Learning | multiview_infonce, mv_dhel | all, allgather, ring |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


def _check_views(views, normalize: bool, axis_name=None) -> jax.Array:
  """Validates a (V, B, D) stack of views (B instances in the global batch under `axis_name`) and
  L2-normalises it if asked."""
  views = _checks.check_array("views", views, ndim=3)
  if views.shape[0] < 2:
    raise ValueError(
        f"`views` must hold at least 2 views along axis 0 (shape (V, B, D) with V >= 2), got shape "
        f"{views.shape}."
    )
  if axis_name is None:
    _checks.check_min_batch("views", views, 2, axis=1, why="a contrastive loss needs a negative")
  else:
    _common.check_global_batch("views", views[0], 2, axis_name, why="a contrastive loss needs a negative")
  return _common.maybe_normalize(views, normalize)


def _row_ids(v: int, b: int, axis_name) -> jax.Array:
  """The global id l·B + i of each flattened local row [view 0; view 1; ...] (B the global batch)."""
  ids = _common.batch_ids(b, axis_name)
  return jnp.concatenate([ids + view * _common.global_size(b, axis_name) for view in range(v)])


def _check_reduction_and_mask(reduction, mask, shape):
  """The per-instance mask (B,) and the validity of the flattened (V·B,) rows [view 0; view 1; ...]."""
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, shape[1])
  return mask, None if mask is None else jnp.tile(mask, shape[0])


def _alignment(views: jax.Array, inv_t) -> jax.Array:
  """pos_i = log Σ_l Σ_{m≠l} exp(<u_il, u_im>/τ) per instance, float32 (B,), from the V×V Gram only."""
  v = views.shape[0]
  gram = jnp.einsum("lbd,mbd->blm", views, views, preferred_element_type=jnp.float32)
  off_diagonal = ~jnp.eye(v, dtype=bool)
  return jax.nn.logsumexp(inv_t * gram, axis=(1, 2), where=off_diagonal[None])


def _view_ids(v: int, b: int) -> jax.Array:
  """The view id l of row r = l·B + i of the flattened (V·B, D) views."""
  return jnp.repeat(jnp.arange(v, dtype=jnp.int32), b)


@_common.keyword_only
@_common.shardable("views", "mask", batch_axis={"views": 1})
def multiview_infonce(
    views: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MV-InfoNCE: InfoNCE over all V views of an instance in one term per instance.

  "A Principled Framework for Multi-View Contrastive Learning" (Koromilas et al., 2025). With
  u_{i,l} = views[l, i] and s(u, v) = <u, v> / τ:

      loss = mean_i [ log Σ_l Σ_{(j,m) ≠ (i,l)} exp s(u_{i,l}, u_{j,m})
                      − log Σ_l Σ_{m ≠ l} exp s(u_{i,l}, u_{i,m}) ]

  The numerator holds every ordered pair of different views of instance i; the denominator, for every
  view of i, every other embedding of the batch: the other views of i (the positives) and all views of
  every other instance (same view included). This is the authors' code (`MVINFONCE`); their printed
  formula restricts the denominator to m ≠ l, which would drop the same-view negatives and not reduce
  to NT-Xent. One term per instance, not per view: the view terms share a single log.

  With V = 2, writing a_i = log Σ_{c ≠ (i,1)} exp s(u_{i,1}, u_c), b_i the same for view 2 and
  p_i = s(u_{i,1}, u_{i,2}):

      loss = mean_i [ −p_i + log ½(exp a_i + exp b_i) ]  >=  mean_i [ −p_i + ½(a_i + b_i) ] = NT-Xent

  (Jensen), with equality exactly when a_i = b_i for every i (e.g. the second view a reflection of the
  first).

  Args:
    views: (V, B, D) embeddings, V >= 2 views of B >= 2 instances (views[l, i] is view l of i).
    temperature: τ > 0 (scalar, may be traced).
    normalize: L2-normalise each embedding first.
    reduction: "mean", "sum" or "none" (the (B,) per-instance terms, this device's under `axis_name`).
    mask: None or bool (B,): False marks padding instances, whose views are neither anchors nor
      negatives.
    impl: similarity engine for the (VB)² denominator, see `jaxcl.ops.available_impls()`; "allgather" |
      "ring" with `axis_name` / `mesh`: the instances split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the instances (axis 1 of `views`, and
      `mask`) are split, every device holding all V views of its instances.
  Returns:
    Scalar float32 loss (>= 0), or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> v = jnp.stack([jnp.eye(2)] * 3)  # 3 identical views of 2 orthogonal instances
  >>> round(float(multiview_infonce(v, temperature=1.0)), 4)  # log(1 + 3 / (2e))
  0.4394
  """
  views = _check_views(views, normalize, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  mask, valid = _check_reduction_and_mask(reduction, mask, views.shape)
  v, b, d = views.shape
  z = jnp.reshape(views, (v * b, d))
  rows = _row_ids(v, b, axis_name)
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(rows, rows), row_valid=valid, col_valid=valid,
                      impl=impl, axis_name=axis_name).rows
  energy = jax.nn.logsumexp(jnp.reshape(_common.zero_invalid(lse, valid), (v, b)), axis=0)
  return _common.reduce_loss(energy - _alignment(views, inv_t), reduction, mask, axis_name)


@_common.keyword_only
@_common.shardable("views", "mask", batch_axis={"views": 1})
def mv_dhel(
    views: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MV-DHEL: multi-view decoupled hyperspherical energy loss.

  "A Principled Framework for Multi-View Contrastive Learning" (Koromilas et al., 2025). Alignment over
  all views of the same instance, uniformity only among embeddings of the *same view*:

      loss = mean_i [ Σ_l log Σ_{j ≠ i} exp s(u_{i,l}, u_{j,l})
                      − log Σ_l Σ_{m ≠ l} exp s(u_{i,l}, u_{i,m}) ]

  i.e. −log( Σ_{l≠m} exp s_{il,im} / Π_l Σ_{j≠i} exp s_{il,jl} ). Choices where the paper leaves a
  detail open: the uniformity sums leave out j = i (the authors' `MVDHEL` code and the DHEL definition;
  the printed formula includes the constant self term), and the alignment sums over ordered view pairs
  (the printed formula; the authors' code sums unordered pairs, which is this loss + log 2, the same
  gradients). The uniformity term of view l depends on view l only, so transforming a whole view by an
  orthogonal map changes only the alignment term. The loss can be negative.

  With V = 2: loss = mean_i [ −s(u_{i,1}, u_{i,2}) − log 2 + log Σ_{j≠i} e^{s(u_{i,1}, u_{j,1})}
  + log Σ_{j≠i} e^{s(u_{i,2}, u_{j,2})} ].

  Args:
    views: (V, B, D) embeddings, V >= 2 views of B >= 2 instances (views[l, i] is view l of i).
    temperature: τ > 0 (scalar, may be traced).
    normalize: L2-normalise each embedding first.
    reduction: "mean", "sum" or "none" (the (B,) per-instance terms, this device's under `axis_name`).
    mask: None or bool (B,): False marks padding instances, whose views are neither anchors nor
      negatives.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the instances split over devices. The same-view restriction is an `include=` mask on
      view ids over the (VB)² matrix.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; the instances (axis 1 of `views`, and
      `mask`) are split, every device holding all V views of its instances.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> v = jnp.stack([jnp.eye(2)] * 3)  # 3 identical views of 2 orthogonal instances
  >>> round(float(mv_dhel(v, temperature=1.0)), 4)  # 3 · log(e⁰) − log(6e)
  -2.7918
  """
  views = _check_views(views, normalize, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  mask, valid = _check_reduction_and_mask(reduction, mask, views.shape)
  v, b, d = views.shape
  z = jnp.reshape(views, (v * b, d))
  view = _view_ids(v, b)
  rows = _row_ids(v, b, axis_name)
  lse = ops.logsumexp(
      z, z, scale=inv_t, exclude=(rows, rows), include=(view, view), row_valid=valid, col_valid=valid,
      impl=impl, axis_name=axis_name
  ).rows
  uniformity = jnp.sum(jnp.reshape(_common.zero_invalid(lse, valid), (v, b)), axis=0)
  return _common.reduce_loss(uniformity - _alignment(views, inv_t), reduction, mask, axis_name)
