"""Online clustering against learned prototypes: Sinkhorn-Knopp equipartitioned codes and SwAV's
swapped prediction."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common
from jaxcl.ops import sharded


def _check_iterations(iterations) -> int:
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
    raise ValueError(f"`iterations` must be an int >= 0 (Sinkhorn-Knopp rescalings), got {iterations!r}.")
  return iterations


def _batch_columns_logsumexp(log_q: jax.Array, axis_name) -> jax.Array:
  """(K,) log Σ_i exp log_q_ik over every row of the global batch."""
  lse = jax.nn.logsumexp(log_q, axis=0)
  return lse if axis_name is None else sharded.combine_logsumexp(lse, axis_name, scatter=False)


@_common.keyword_only
def sinkhorn_knopp(
    scores: jax.Array,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    mask: jax.Array | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Equipartitioned soft codes: the B samples of a batch spread evenly over K prototypes.

  "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV, Caron et al.,
  2020), Sec. 3.1: the codes solve max_Q Tr(Qᵀ S) + ε H(Q) over the transportation polytope (every
  prototype gets B/K samples, every sample one unit of weight), approximately, by a few Sinkhorn-Knopp
  rescalings of Q = exp(S / ε) as in the authors' `distributed_sinkhorn`:

      Q ← Q / Σ_ik Q_ik
      repeat `iterations` times:
        Q_ik ← Q_ik / (K · Σ_i' Q_i'k)        every prototype's total weight 1/K
        Q_ik ← Q_ik / (B · Σ_k' Q_ik')        every sample's total weight 1/B
      codes = B · Q                            (each row sums to 1 when iterations >= 1)

  computed in the log domain (the same Q, without overflow or underflow for small ε). The sums over
  samples run over the global batch: under `axis_name` (inside `shard_map`) across devices; on batch-
  sharded global arrays under `jax.jit`, XLA inserts the same all-reduces. No gradient.

  Args:
    scores: (B, K) scores of samples against prototypes (SwAV: <z_i, c_k>, both L2-normalised).
    epsilon: ε > 0, the entropic regularisation (SwAV: 0.05; smaller is closer to hard assignment).
    iterations: rescaling rounds (SwAV: 3).
    mask: None or bool (B,): padding rows take no part (their codes are 0) and B counts the real rows.
    axis_name: the batch split over devices (inside `jax.shard_map`); the sums run over every device.
  Returns:
    (B, K) float32 codes; this device's rows under `axis_name`.

  >>> import jax.numpy as jnp
  >>> codes = sinkhorn_knopp(jnp.array([[1.0, 0.9], [0.8, 0.1], [0.9, 0.0], [0.7, 0.2]]), epsilon=0.5,
  ...                        iterations=50)
  >>> [round(float(x), 3) for x in codes.sum(0)]  # each prototype gets B / K = 2 samples
  [2.0, 2.0]
  """
  scores = _checks.check_array("scores", scores, ndim=2)
  _checks.check_positive("epsilon", epsilon)
  iterations = _check_iterations(iterations)
  mask = _common.sample_mask(mask, scores.shape[0])
  log_b = jnp.log(_common.batch_sum(jnp.ones(scores.shape[0], jnp.float32) if mask is None
                                    else mask.astype(jnp.float32), axis_name))
  valid = lambda x: x if mask is None else jnp.where(mask[:, None], x, -jnp.inf)
  log_q = valid(jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon)
  log_q = log_q - _common.batch_logsumexp(log_q, axis_name)
  for _ in range(iterations):
    log_q = log_q - _batch_columns_logsumexp(log_q, axis_name) - math.log(scores.shape[1])
    log_q = valid(log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - log_b)
  codes = jnp.exp(log_q + log_b)
  return codes if mask is None else jnp.where(mask[:, None], codes, 0.0)


@_common.keyword_only
def swav(
    scores: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    assign_views: Sequence[int] = (0, 1),
    queue_scores: jax.Array | None = None,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""SwAV: each view predicts the Sinkhorn-Knopp codes of the other views ("swapped prediction").

  "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (Caron et al., 2020),
  Eq. 1-3, as the authors' `main_swav.py` computes it. With s_iv = scores[i, v] (B, V, K): the scores of
  view v of sample i against the K prototypes, A = `assign_views` (the views whose codes are targets,
  SwAV's 2 full-resolution crops of the multi-crop views) and V views in all,

      q_a = sinkhorn_knopp(s_{·a}; ε, iterations)                   (no gradient)
      ℓ_i = 1/|A| Σ_{a ∈ A} 1/(V − 1) Σ_{v ≠ a} −Σ_k q_{a,ik} log softmax(s_iv / τ)_k
      loss = mean_i ℓ_i

  With `queue_scores` (the scores of embeddings kept from earlier batches against the current
  prototypes, SwAV's queue for small batches), the codes of view a come from the Sinkhorn-Knopp of the
  queue's rows and the batch's together, and only the batch's rows are kept.

  Args:
    scores: (B, V, K) prototype scores of V >= 2 views (sample-major, as `supcon`'s features).
    temperature: τ > 0 of the predicted assignments (SwAV: 0.1).
    epsilon, iterations: of `sinkhorn_knopp` (SwAV: 0.05 and 3).
    assign_views: the distinct views whose codes are targets (SwAV: (0, 1)).
    queue_scores: None or (Q, |A|, K): queue rows for each assigned view, in the order of assign_views.
    reduction: "mean", "sum" or "none" (the (B,) ℓ_i, 0 where masked).
    mask: None or bool (B,): padding samples are neither in the Sinkhorn-Knopp nor in the mean.
    axis_name: the batch (and the queue) split over devices inside `jax.shard_map`: the codes are the
      global batch's, the mean is over the global batch.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[[1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [-1.0, 1.0]]])  # 2 samples, 2 views agree
  >>> float(swav(s, temperature=0.1, epsilon=0.05)) < 1e-6  # codes one-hot, predictions confident
  True
  """
  scores = _checks.check_array("scores", scores, ndim=3)
  b, v, k = scores.shape
  if v < 2:
    raise ValueError(f"`scores` must hold V >= 2 views, shape (B, V, K), got {scores.shape}.")
  assign = tuple(assign_views)
  if not assign or len(set(assign)) != len(assign) or not all(
      isinstance(a, int) and not isinstance(a, bool) and 0 <= a < v for a in assign):
    raise ValueError(f"`assign_views` must be distinct view indices in [0, {v}), got {assign_views!r}.")
  if queue_scores is not None:
    queue_scores = _checks.check_array("queue_scores", queue_scores, ndim=3)
    if queue_scores.shape[1:] != (len(assign), k):
      raise ValueError(f"`queue_scores` must have shape (Q, {len(assign)}, {k}) (one column per assigned "
                       f"view), got {queue_scores.shape}.")
  _checks.check_temperature("temperature", temperature)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  inv_t = _common.inverse_temperature(temperature)
  log_p = jax.nn.log_softmax(inv_t * scores.astype(jnp.float32), axis=-1)  # (B, V, K)
  terms = []
  for j, a in enumerate(assign):
    if queue_scores is None:
      codes = sinkhorn_knopp(scores[:, a], epsilon=epsilon, iterations=iterations, mask=mask, axis_name=axis_name)
    else:
      rows = jnp.concatenate([queue_scores[:, j].astype(scores.dtype), scores[:, a]])
      both = None if mask is None else jnp.concatenate([jnp.ones(queue_scores.shape[0], bool), mask])
      codes = sinkhorn_knopp(rows, epsilon=epsilon, iterations=iterations, mask=both, axis_name=axis_name)[-b:]
    others = [w for w in range(v) if w != a]
    cross_entropy = -jnp.sum(codes[:, None, :] * log_p[:, others], axis=-1)  # (B, V − 1)
    terms.append(jnp.mean(cross_entropy, axis=1))
  return _common.reduce_loss(jnp.mean(jnp.stack(terms), axis=0), reduction, mask, axis_name)
