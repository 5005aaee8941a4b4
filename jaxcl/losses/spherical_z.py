"""The Z-loss ("The Z-loss: a shift and scale invariant classification loss belonging to the Spherical
Family", de Brébisson & Vincent, 2016) on logits, and its contrastive form over a similarity matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common


def _z_from_moments(target, total, total_sq, k: int, eps: float):
  mean = total / k
  var = jnp.maximum(total_sq / k - mean * mean, 0.0)
  return (target - mean) * jax.lax.rsqrt(var + eps)


@_common.keyword_only
def spherical_z_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    a: float | jax.Array,
    b: float | jax.Array,
    eps: float = 1e-8,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""The Z-loss: a classification loss on z-normalised logits, invariant to their shift and scale.

  "The Z-loss: a shift and scale invariant classification loss belonging to the Spherical Family"
  (de Brébisson & Vincent, 2016). Not the "z-loss" logit regulariser (log Z)² of large language
  models. With μ and σ the mean and (population) standard deviation of one row's K logits,

      z_c  = (o_c − μ) / σ                      ∈ [−√(K−1), √(K−1)]
      loss = mean_i (1/a) softplus( a (b − z_{y_i}) )

  so adding a constant to the logits or multiplying them by a positive one changes nothing (no
  temperature to tune). `a` (sharpness) and `b` (where the target's z-score stops being pushed up) are
  the paper's two hyper-parameters, tuned per task there; there is no default. σ is computed as
  √(var + eps) so that constant logits stay finite.

  Args:
    logits: (B, K) scores, K >= 2. labels: (B,) integer targets in [0, K).
    a: > 0. b: finite.
    eps: added to the variance.
    reduction: "mean", "sum" or "none": the (B,) per-row terms (1/a) softplus(a (b − z_{y_i})).
    mask: None or bool (B,): False marks padding rows, left out (their labels are not checked).
  Returns:
    Scalar float32 mean loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> o = jnp.array([[3.0, 1.0]])  # z = (1, -1)
  >>> round(float(spherical_z_loss(o, jnp.array([0]), a=1.0, b=1.0)), 4)  # softplus(0)
  0.6931
  """
  logits = _checks.check_array("logits", logits, ndim=2)
  b_, k = logits.shape
  if k < 2:
    raise ValueError(f"`logits` needs at least 2 classes (columns), got shape {logits.shape}.")
  labels = _checks.check_labels("labels", labels, b_)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b_)
  lab = _checks.concrete_value(labels)
  kept = _checks.concrete_value(mask)
  if lab is not None and mask is not None:
    lab = lab[kept] if kept is not None else None
  if lab is not None and lab.size and (lab.min() < 0 or lab.max() >= k):
    raise ValueError(f"`labels` must lie in [0, {k}), got values in [{lab.min()}, {lab.max()}].")
  _checks.check_positive("a", a)
  _checks.check_finite("b", b)
  if mask is not None:
    labels = jnp.where(mask, labels, 0)  # a padding row's label may be anything
  o = logits.astype(jnp.float32)
  mean = jnp.mean(o, axis=-1)
  var = jnp.mean(jnp.square(o - mean[:, None]), axis=-1)
  target = jnp.take_along_axis(o, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  z = (target - mean) * jax.lax.rsqrt(var + eps)
  a = jnp.asarray(a, jnp.float32)
  return _common.reduce_loss(jax.nn.softplus(a * (jnp.asarray(b, jnp.float32) - z)) / a, reduction, mask)


@_common.keyword_only
def spherical_z_contrastive(
    query: jax.Array,
    key: jax.Array,
    *,
    a: float | jax.Array,
    b: float | jax.Array,
    normalize: bool = True,
    eps: float = 1e-8,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""The Z-loss over a similarity matrix: each query classifies its own key among the batch's keys.

  `spherical_z_loss(q @ kᵀ, arange(B))` ("The Z-loss: a shift and scale invariant classification loss
  belonging to the Spherical Family", de Brébisson & Vincent, 2016) — without the B×B matrix. The
  z-score needs only the row mean and second moment of S_i· = <q_i, k_j>, both linear or quadratic
  forms in q_i:

      Σ_j S_ij = <q_i, Σ_j k_j>,      Σ_j S_ij² = q_iᵀ (Kᵀ K) q_i       (a D×D matrix)

  so it costs O(B·D²) on every backend, and, being scale invariant, has no temperature.

  Args:
    query, key: (B, D) embeddings, row i a positive pair, B >= 2.
    a: > 0. b: finite (see `spherical_z_loss`).
    normalize: L2-normalise both inputs first.
    eps: added to the variance.
    reduction: "mean", "sum" or "none": the (B,) per-query terms (1/a) softplus(a (b − z_ii)).
    mask: None or bool (B,): False marks padding pairs, which are neither queries nor keys (the row
      moments run over the valid keys, B their number).
  Returns:
    Scalar float32 mean loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # S = I: z = (1, -1) per row
  >>> round(float(spherical_z_contrastive(x, x, a=1.0, b=1.0)), 4)
  0.6931
  """
  q, k = _common.pair("query", query, "key", key, normalize=normalize)
  _checks.check_positive("a", a)
  _checks.check_finite("b", b)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, q.shape[0])
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  n = k32.shape[0]
  if mask is not None:
    k32 = jnp.where(mask[:, None], k32, 0.0)  # padding keys out of both moments
    n = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
  total = q32 @ jnp.sum(k32, axis=0)
  total_sq = jnp.sum((q32 @ (k32.T @ k32)) * q32, axis=-1)
  z = _z_from_moments(_common.rowwise_dot(q32, k32), total, total_sq, n, eps)
  a = jnp.asarray(a, jnp.float32)
  return _common.reduce_loss(jax.nn.softplus(a * (jnp.asarray(b, jnp.float32) - z)) / a, reduction, mask)
