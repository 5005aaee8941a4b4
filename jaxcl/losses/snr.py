"""The signal-to-noise-ratio distance and its triplet loss ("Signal-to-Noise Ratio: A Robust Distance
Metric for Deep Metric Learning", Yuan et al., CVPR 2019)."""

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
