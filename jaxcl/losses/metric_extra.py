"""Metric-learning pieces: the SNR distance (and its triplet loss) and the spherical Z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common

_VAR_EPS = 1e-12


def _centred_sq(x: jax.Array) -> jax.Array:
  """Σ_d (x_d − mean(x))² per row, float32."""
  x = x.astype(jnp.float32)
  c = x - jnp.mean(x, axis=-1, keepdims=True)
  return jnp.sum(c * c, axis=-1)


@_common.keyword_only
def snr_distance(anchor: jax.Array, other: jax.Array) -> jax.Array:
  r"""The signal-to-noise-ratio distance between row-aligned embeddings, (B,) float32.

  "Signal-to-Noise Ratio: A Robust Distance Metric for Deep Metric Learning" (Yuan et al., CVPR 2019):
  the anchor h_a is the signal and the difference n = h_o − h_a the noise; with variances over the
  feature dimensions,

      d_S(h_a, h_o) = 1 / SNR = var(h_o − h_a) / var(h_a)

  It is not symmetric (the anchor sets the scale) and is invariant to scaling both embeddings
  together. For zero-mean rows and a unit-norm anchor it is the squared Euclidean distance
  ‖h_o − h_a‖². A constant anchor (zero
  variance) gives a large finite value (the variance is floored at 1e-12).

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1.0, -1.0]])  # var(a) = 1
  >>> snr_distance(a, jnp.array([[2.0, 0.0]])).tolist()  # n = (1, 1): var(n) = 0
  [0.0]
  """
  anchor = _checks.check_array("anchor", anchor, ndim=2)
  other = _checks.check_array("other", other, ndim=2)
  _checks.check_same_shape("anchor", anchor, "other", other)
  diff = other.astype(jnp.float32) - anchor.astype(jnp.float32)
  return _centred_sq(diff) / jnp.maximum(_centred_sq(anchor), _VAR_EPS)


@_common.keyword_only
def snr_triplet(
    anchor: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    margin: float | jax.Array = 0.2,
    reg_weight: float | jax.Array = 0.005,
    normalize: bool = False,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Triplet loss on the SNR distance, with the paper's zero-mean regulariser.

  "Signal-to-Noise Ratio: A Robust Distance Metric for Deep Metric Learning" (Yuan et al., CVPR 2019),
  the DSML triplet variant:

      loss = mean_i max( d_S(a_i, p_i) − d_S(a_i, n_i) + α, 0 ) + λ · mean_{h ∈ a, p, n} |Σ_d h_d|

  The regulariser keeps the embeddings zero-mean, which the SNR analysis assumes. No code of the
  authors' was found: λ = 0.005 and α = 0.2 are the defaults of Roth et al.'s reimplementation
  (Confusezius/Revisiting_Deep_Metric_Learning_PyTorch, `criteria/snr.py`), which averages the hinge
  over the active triplets and the regulariser over the anchors only; here both are plain means over
  the batch (the regulariser over a, p and n). The SNR distance of two independent zero-mean
  unit-variance embeddings is 2. `jaxcl.losses.triplet` has no `distance=`
  option, hence this separate function. With zero-mean rows, unit-norm anchors and λ = 0 it is
  `triplet(..., squared=True, normalize=False)` (see `snr_distance`).

  Args:
    anchor, positive, negative: (B, D) embeddings, row-aligned, D >= 2.
    margin: α >= 0. reg_weight: λ >= 0.
    normalize: L2-normalise the three inputs first (off by default: the SNR distance already
      normalises by the anchor's variance).
    reduction: "mean", "sum" or "none": the (B,) per-triple terms
      ℓ_i = max(d_S(a_i, p_i) − d_S(a_i, n_i) + α, 0) + (λ/3)(|Σ_d a_id| + |Σ_d p_id| + |Σ_d n_id|),
      whose mean is the loss.
    mask: None or bool (B,): False marks padding triples, left out of the hinge and the regulariser.
  Returns:
    Scalar float32 mean loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1.0, -1.0]])
  >>> # d(a, p) = 0, d(a, n) = var(n - a) / var(a) = 4: max(0 - 4 + 0.2, 0) = 0
  >>> round(float(snr_triplet(a, a + 1.0, -a, reg_weight=0.0)), 4)
  0.0
  """
  anchor = _checks.check_array("anchor", anchor, ndim=2)
  positive = _checks.check_array("positive", positive, ndim=2)
  negative = _checks.check_array("negative", negative, ndim=2)
  _checks.check_same_shape("anchor", anchor, "positive", positive)
  _checks.check_same_shape("anchor", anchor, "negative", negative)
  _checks.check_min_batch("anchor", anchor, 1, why="the mean needs a triple")
  if anchor.shape[1] < 2:
    raise ValueError(f"`anchor` needs at least 2 features for a variance, got shape {anchor.shape}.")
  _checks.check_non_negative("margin", margin)
  _checks.check_non_negative("reg_weight", reg_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, anchor.shape[0])
  a, p, n = (_common.maybe_normalize(x, normalize) for x in (anchor, positive, negative))
  gap = snr_distance(a, p) - snr_distance(a, n)
  hinge = jax.nn.relu(gap + jnp.asarray(margin, jnp.float32))
  sums = jnp.stack([jnp.sum(x.astype(jnp.float32), axis=-1) for x in (a, p, n)])  # (3, B)
  per_triple = hinge + jnp.asarray(reg_weight, jnp.float32) * jnp.mean(jnp.abs(sums), axis=0)
  return _common.reduce_loss(per_triple, reduction, mask)


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
