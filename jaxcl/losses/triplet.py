"""Metric-learning losses on Euclidean distances: the FaceNet triplet loss and batch-hard mining."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common


def _safe_sqrt(sq: jax.Array) -> jax.Array:
  """√sq for sq >= 0 whose gradient is 0 (not inf/NaN) at sq = 0."""
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _distance(a: jax.Array, b: jax.Array, squared: bool) -> jax.Array:
  """‖a_i − b_i‖ (or its square) per row, float32 whatever the input dtype."""
  diff = a.astype(jnp.float32) - b.astype(jnp.float32)
  sq = jnp.sum(diff * diff, axis=-1)
  return sq if squared else _safe_sqrt(sq)


@_common.keyword_only
def triplet(
    anchor: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    margin: float | jax.Array = 0.2,
    squared: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Triplet margin loss on given (anchor, positive, negative) triples.

  "FaceNet: A Unified Embedding for Face Recognition and Clustering" (Schroff et al., CVPR 2015):

      loss = mean_i max( d(a_i, p_i) − d(a_i, n_i) + margin, 0 )

  with d the Euclidean distance between L2-normalised embeddings (`squared=True`: the squared distance,
  as in FaceNet; `normalize=False`: raw embeddings). The square root has a zero gradient at d = 0, so
  identical anchor and positive give finite gradients. Computed in float32 for any input dtype.

  Args:
    anchor, positive, negative: (B, D) embeddings, row-aligned.
    margin: α >= 0.
    squared: use ‖a − b‖² instead of ‖a − b‖.
    normalize: L2-normalise the three inputs first.
    reduction: "mean", "sum" or "none" (the (B,) per-triple losses).
    mask: None or bool (B,): False marks padding triples, left out of the mean.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1.0, 0.0]])
  >>> round(float(triplet(a, jnp.array([[0.0, 1.0]]), a)), 4)  # sqrt(2) - 0 + 0.2
  1.6142
  """
  anchor = _checks.check_array("anchor", anchor, ndim=2)
  positive = _checks.check_array("positive", positive, ndim=2)
  negative = _checks.check_array("negative", negative, ndim=2)
  _checks.check_same_shape("anchor", anchor, "positive", positive)
  _checks.check_same_shape("anchor", anchor, "negative", negative)
  _checks.check_min_batch("anchor", anchor, 1, why="the mean needs a triple")
  _checks.check_non_negative("margin", margin)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, anchor.shape[0])
  a, p, n = (_common.maybe_normalize(x, normalize) for x in (anchor, positive, negative))
  gap = _distance(a, p, squared) - _distance(a, n, squared)
  return _common.reduce_loss(jax.nn.relu(gap + jnp.asarray(margin, jnp.float32)), reduction, mask)


@_common.keyword_only
def batch_hard_triplet(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float | jax.Array = 0.2,
    squared: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Batch-hard triplet loss: each anchor against its hardest positive and hardest negative.

  "In Defense of the Triplet Loss for Person Re-Identification" (Hermans, Beyer & Leibe, 2017):

      loss_i = max( max_{j ≠ i, y_j = y_i} d(x_i, x_j) − min_{k: y_k ≠ y_i} d(x_i, x_k) + margin, 0 )
      loss   = mean of loss_i over the anchors that have a positive and a negative in the batch

  d is the Euclidean distance between L2-normalised embeddings (`squared=True`: squared distance;
  `normalize=False`: raw embeddings). Anchors whose label occurs once (no positive) or that share their
  label with the whole batch (no negative) are left out of the mean; the loss is 0 when no anchor is
  valid. Mining runs on the (B, B) distance matrix from a float32-accumulated Gram matrix (O(B²)
  memory); the selected distances are then recomputed from the embedding differences, so the gradient
  is exact and flows to the anchor, its hardest positive and its hardest negative (one of them on ties).

  Args:
    embeddings: (B, D), B >= 2.
    labels: (B,) integer class ids.
    margin: α >= 0.
    squared: use ‖a − b‖² instead of ‖a − b‖.
    normalize: L2-normalise the embeddings first.
    reduction: "mean" (over the anchors with a positive and a negative), "sum" or "none" (the (B,)
      loss_i, 0 for the anchors left out).
    mask: None or bool (B,): False marks padding rows, which are neither anchors, positives nor
      negatives.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  >>> # each anchor: hardest positive at sqrt(2), a negative equal to itself
  >>> round(float(batch_hard_triplet(x, jnp.array([0, 0, 1, 1]))), 4)
  1.6142
  """
  embeddings = _checks.check_array("embeddings", embeddings, ndim=2)
  _checks.check_min_batch("embeddings", embeddings, 2, why="a triplet needs a second example")
  b = embeddings.shape[0]
  labels = _checks.check_labels("labels", labels, b)
  _checks.check_non_negative("margin", margin)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  x = _common.maybe_normalize(embeddings, normalize)

  # Mining (no gradient): squared distances ‖x_i‖² + ‖x_j‖² − 2<x_i, x_j> from the Gram matrix.
  xs = jax.lax.stop_gradient(x)
  gram = jnp.einsum("id,jd->ij", xs, xs, preferred_element_type=jnp.float32)
  norms = jnp.diagonal(gram)
  sq = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
  same = labels[:, None] == labels[None, :]
  not_self = ~jnp.eye(b, dtype=bool)
  is_pos = same & not_self
  is_neg = ~same
  if mask is not None:  # padding rows are neither anchors nor candidates
    both = mask[:, None] & mask[None, :]
    is_pos, is_neg = is_pos & both, is_neg & both
  hardest_pos = jnp.argmax(jnp.where(is_pos, sq, -1.0), axis=1)
  hardest_neg = jnp.argmin(jnp.where(is_neg, sq, jnp.inf), axis=1)
  valid = jnp.any(is_pos, axis=1) & jnp.any(is_neg, axis=1)

  gap = _distance(x, x[hardest_pos], squared) - _distance(x, x[hardest_neg], squared)
  per_anchor = jax.nn.relu(gap + jnp.asarray(margin, jnp.float32))
  return _common.reduce_loss(per_anchor, reduction, valid)
