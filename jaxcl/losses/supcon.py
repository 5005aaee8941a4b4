"""SupCon family: supervised contrastive losses in which every same-label view is a positive (SupCon,
and focal SupCon of Core-tuning, which weights the hard positives up)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.ops import engines
from jaxcl.losses import _common
from jaxcl.losses import _tiled


@_common.keyword_only
@_common.shardable("features", "labels", "mask")
def supcon(
    features: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    base_temperature: float | jax.Array | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Supervised contrastive loss L_out, every view an anchor (contrast_mode "all").

  "Supervised Contrastive Learning" (Khosla et al., NeurIPS 2020), eq. (2). The N·V views z_a (views of
  a sample share its label) are all anchors; P(a) = {p ≠ a : y_p = y_a} are the positives of a and
  A = {a' : |P(a')| > 0} the anchors that have one:

      s_ab = <z_a, z_b> / τ
      ℓ_a = (τ / τ_base) [ −(1/|P(a)|) Σ_{p ∈ P(a)} s_ap + log Σ_{b ≠ a} exp s_ab ],   loss = mean_{a ∈ A} ℓ_a

  The positive term is linear in S and never needs it: Σ_{p ∈ P(a)} <z_a, z_p> is
  <z_a, Σ_{b: y_b = y_a} z_b> − <z_a, z_a>, a segment sum over the labels. Anchors without a positive
  are left out of the mean (the reference PyTorch code counts them as zeros instead); when no anchor has
  one the loss is undefined: an error if `labels` is concrete, 0 under `jit`.

  Args:
    features: (N, D) embeddings, or (N, V, D) with V views per sample.
    labels: (N,) integer class labels (any values; only equality matters).
    temperature: τ > 0 (scalar, may be traced).
    base_temperature: τ_base > 0; None means τ (no rescaling). The paper's code uses 0.07.
    normalize: L2-normalise the features first.
    reduction: "mean" (over A), "sum" or "none": the (N·V,) ℓ_a in view-major order (row v·N + i is
      view v of sample i), 0 for anchors outside A; this device's under `axis_name`.
    mask: None or bool (N,): False marks padding samples, whose views are neither anchors, positives
      nor negatives.
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" / "ring" for a batch split
      over devices.
    axis_name, mesh: the batch split over devices (see "Sharded batches" in `jaxcl.losses`): the class
      sums Σ_{b: y_b = y_a} z_b then run over every device (`jaxcl.ops.sharded.matched_sum`).
  Returns:
    Scalar float32 loss, or (N·V,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  >>> round(float(supcon(x, jnp.array([0, 0, 1, 1]), temperature=1.0)), 4)  # log(e + 2) - 1
  0.5514
  """
  features = _checks.check_array("features", features, ndim=(2, 3))
  n = features.shape[0]
  _common.check_global_batch("features", features, 2, axis_name, why="a contrastive loss needs a negative")
  labels = _checks.check_labels("labels", labels, n)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, n)
  inv_t = _common.inverse_temperature(temperature)
  factor = 1.0
  if base_temperature is not None:
    _checks.check_positive("base_temperature", base_temperature)
    base = _checks.check_scalar("base_temperature", base_temperature)
    factor = _checks.check_scalar("temperature", temperature) / base

  views = 1 if features.ndim == 2 else features.shape[1]
  concrete = _checks.concrete_value(labels)
  if mask is not None and concrete is not None:
    kept = _checks.concrete_value(mask)
    concrete = None if kept is None else concrete[kept]
  if axis_name is None and views == 1 and concrete is not None and np.unique(concrete).size == concrete.size:
    raise ValueError(
        "`labels` are all distinct and `features` has one view per sample, so no anchor has a "
        f"positive: SupCon needs a repeated label or V >= 2 views, got labels {concrete} and features "
        f"of shape {features.shape}."
    )

  # Anchors in view-major order: row v·N + i is view v of sample i.
  z = jnp.reshape(jnp.swapaxes(features, 0, 1), (-1, features.shape[-1])) if views > 1 else features
  z = _common.maybe_normalize(z, normalize)
  m = z.shape[0]
  valid = None if mask is None else jnp.tile(mask, views)
  z32 = _common.zero_invalid(z.astype(jnp.float32), None if valid is None else valid[:, None])
  ones = jnp.ones((m,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  if axis_name is None:
    ids = jnp.tile(_common.compact_ids(labels), views)
    class_sum = jax.ops.segment_sum(z32, ids, num_segments=m)[ids]
    class_size = jax.ops.segment_sum(ones, ids, num_segments=m)[ids]
  else:  # labels are compared across devices as they are (only equality matters)
    ids = jnp.tile(labels.astype(jnp.int32), views)
    with_ones = jnp.concatenate([z32, ones[:, None]], axis=1)
    sums = ops.sharded.matched_sum(ids, with_ones, axis_name=axis_name, impl=impl)
    class_sum, class_size = sums[:, :-1], sums[:, -1]
  n_pos = class_size - 1.0
  pos_sum = _common.rowwise_dot(z32, class_sum) - _common.rowwise_dot(z32, z32)
  has_pos = n_pos > 0 if valid is None else (n_pos > 0) & valid
  mean_pos = inv_t * pos_sum / jnp.maximum(n_pos, 1.0)

  n = features.shape[0]
  self_ids = jnp.concatenate([_common.batch_ids(n, axis_name) + v * _common.global_size(n, axis_name)
                              for v in range(views)])
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(self_ids, self_ids), row_valid=valid, col_valid=valid,
                      impl=impl, axis_name=axis_name).rows
  per_anchor = factor * (_common.zero_invalid(lse, has_pos) - mean_pos)
  return _common.reduce_loss(per_anchor, reduction, has_pos, axis_name)


# ------------------------------------------------------------------------------------- focal SupCon
@_common.keyword_only
@_common.shardable("features", "labels", "mask")
def focal_supcon(
    features: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    gamma: float | jax.Array = 1.0,
    average: str = "batch",
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Focal supervised contrastive loss: SupCon with hard positives weighted up.

  The contrastive regulariser of Core-tuning, "Unleashing the Power of Contrastive Self-Supervised
  Visual Models via Contrast-Regularized Fine-Tuning" (Zhang et al., NeurIPS 2021). With the M rows
  (samples × views), p_ap = exp(s_ap/τ) / Σ_{b ≠ a} exp(s_ab/τ) and P(a) the same-label views of anchor a:

      loss = mean_{a: P(a) ≠ ∅} −1/n(a) Σ_{p ∈ P(a)} (1 − p_ap)^γ log p_ap
      n(a) = M (`average="batch"`)  or  |P(a)| (`average="positives"`)

  The defaults follow the authors' code (Vanint/Core-tuning, `focal_SupConLoss`: the weight (1 − p) to
  the first power, γ = 1; the per-anchor sum divided by the row count M, a `.mean(1)` over all
  columns; τ = 0.07; anchors without positives left out of the mean). γ = 0 with
  `average="positives"` is `supcon`; γ generalises the factor as in "Focal Loss for Dense Object
  Detection". The denominator is one log-sum-exp per anchor on `impl`; the focal factor is a
  non-linear function of each positive logit, so the positive sum is a separate row reduction: tiled
  (O(M·tile) memory) on every engine but `dense`, where it uses the M×M matrix. On a batch split over
  devices ("allgather" | "ring" with `axis_name` / `mesh`) the denominators and the positive counts
  are the engine's global reductions, and the positive sum gathers the rows of every device (the ring
  gathers them too: the focal factor needs every positive pair) for this device's anchors.

  Args:
    features: (N, D), or (N, V, D) with V views per sample.
    labels: (N,) integer class labels.
    temperature: τ > 0 (may be traced). gamma: γ >= 0 (may be traced).
    average: "batch" (divide each anchor's sum by M, the authors' code) or "positives" (by |P(a)|,
      SupCon's mean over positives).
    normalize: L2-normalise the features first.
    reduction: "mean" (over the anchors with a positive), "sum" or "none": the (N·V,) per-anchor
      terms −1/n(a) Σ_p (1 − p_ap)^γ log p_ap in view-major order (row v·N + i is view v of sample i),
      0 for anchors without a positive; under `axis_name` this device's rows (its samples' views).
    mask: None or bool (N,): False marks padding samples, whose views are neither anchors, positives
      nor negatives (M then counts the real rows only, for `average="batch"`).
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" / "ring" for a batch split
      over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; labels are compared across devices as
      they are (only equality matters), M counts the global rows.
  Returns:
    Scalar float32 loss, or (N·V,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  >>> # p = e / (e + 2) for every positive: (2 / (e + 2))^γ * (log(e + 2) - 1), then / M = 4
  >>> round(float(focal_supcon(x, jnp.array([0, 0, 1, 1]), temperature=1.0)), 4)
  0.0584
  >>> round(float(focal_supcon(x, jnp.array([0, 0, 1, 1]), temperature=1.0, gamma=2.0, average="positives")), 4)
  0.0991
  """
  z, labels, views = _common.views_to_rows("features", features, labels, axis_name)
  inv_t = _common.inverse_temperature(temperature)
  _checks.check_non_negative("gamma", gamma)
  _checks.check_choice("average", average, ("batch", "positives"))
  _common.check_reduction(reduction)
  mask, valid = _common.row_mask(mask, labels.shape[0], views)
  gamma = jnp.asarray(gamma, jnp.float32)
  z = _common.maybe_normalize(z, normalize)
  m = z.shape[0]
  rows = _common.batch_ids(m, axis_name)  # each local row's position among the gathered rows
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(rows, rows), row_valid=valid, col_valid=valid,
                      impl=impl, axis_name=axis_name).rows
  lse = _common.zero_invalid(lse, valid)
  if axis_name is None:
    # A padding id that equals no real one (compact ids lie in [0, m)): padding is nobody's positive.
    ids = jnp.tile(_common.compact_ids(labels), views)
    ids = ids if valid is None else jnp.where(valid, ids, -1)
    col_ids_of, col_valid_of = ids, None
  else:  # labels are compared across devices as they are; padding is kept out by its validity
    ids = jnp.tile(labels.astype(jnp.int32), views)
    col_ids_of = _common.gather_batch(ids, axis_name)
    col_valid_of = None if valid is None else _common.gather_batch(valid, axis_name)
  keys = _common.gather_batch(z, axis_name)  # the focal factor needs every positive pair
  n_keys = keys.shape[0]

  def focal(s, col_ids):
    positive = (ids[:, None] == col_ids_of[col_ids][None, :]) & (rows[:, None] != col_ids[None, :])
    if col_valid_of is None:
      positive = positive & (ids[:, None] >= 0)
    else:
      positive = positive & valid[:, None] & col_valid_of[col_ids][None, :]
    log_p = jnp.where(positive, s - lse[:, None], 0.0)
    weight = jnp.where(positive, -jnp.expm1(log_p), 0.0)  # 1 − p, accurate near p = 1
    # weight^γ with 0^0 = 1 and a finite gradient at weight = 0.
    safe = jnp.where(weight > 0, weight, 1.0)
    factor = jnp.where(weight > 0, safe ** gamma, jnp.where(gamma == 0, 1.0, 0.0))
    return jnp.where(positive, factor * log_p, 0.0)

  def focal_clamped(s, col_ids):
    # Padded columns of the last tile index past the ids: clamp them (row_sum drops their values).
    return focal(s, jnp.minimum(col_ids, n_keys - 1))

  local_impl = impl if axis_name is None else "auto"  # the gathered rows: dense while small
  total = _tiled.row_sum(z, keys, inv_t, focal_clamped, dense=engines.is_dense(local_impl, m, n_keys))
  ones = jnp.ones((m, 1), jnp.float32) if valid is None else valid.astype(jnp.float32)[:, None]
  if axis_name is None:
    _, count = _common.segment_stats(jnp.zeros((m, 1), jnp.float32), jnp.maximum(ids, 0), valid)
  else:
    count = ops.sharded.matched_sum(ids, ones, axis_name=axis_name, impl=impl)[:, 0]
  n_pos = count - 1.0
  has = _common.and_valid(n_pos > 0, valid)
  n_rows = _common.batch_sum(ones, axis_name)
  n_a = jnp.maximum(n_pos, 1.0) if average == "positives" else n_rows
  per_anchor = jnp.where(has, -total / n_a, 0.0)
  return _common.reduce_loss(per_anchor, reduction, has, axis_name)
