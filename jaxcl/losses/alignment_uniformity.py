"""Alignment and uniformity on the hypersphere (Wang & Isola): the two halves of a contrastive loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common
from jaxcl.ops.engines import SHARDED_IMPLS


@_common.keyword_only
def alignment(
    x: jax.Array,
    y: jax.Array,
    *,
    alpha: float | jax.Array = 2,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Alignment of positive pairs: the mean distance between the two views, to the power α.

  "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
  Hypersphere" (Wang & Isola, ICML 2020):

      L_align = mean_i ‖x_i − y_i‖₂^α        (x, y L2-normalised; α = 2 in the paper)

  ‖·‖^α has a zero gradient at a zero distance, so identical views give finite gradients for any α > 0.
  Computed in float32 for any input dtype.

  Args:
    x, y: (B, D) embeddings of the two views, row-aligned.
    alpha: α > 0.
    normalize: L2-normalise x and y first.
    reduction: "mean", "sum" or "none" (the (B,) ‖x_i − y_i‖^α).
    mask: None or bool (B,): False marks padding pairs, left out.
  Returns:
    Scalar float32 mean, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> float(alignment(x, x[::-1]))  # ‖e1 − e2‖² = 2
  2.0
  """
  x = _checks.check_array("x", x, ndim=2)
  y = _checks.check_array("y", y, ndim=2)
  _checks.check_same_shape("x", x, "y", y)
  _checks.check_min_batch("x", x, 1, why="the mean needs a pair")
  _checks.check_positive("alpha", alpha)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, x.shape[0])
  a = _common.maybe_normalize(x, normalize).astype(jnp.float32)
  b = _common.maybe_normalize(y, normalize).astype(jnp.float32)
  sq = jnp.sum((a - b) ** 2, axis=-1)
  half_alpha = jnp.asarray(alpha, jnp.float32) / 2.0
  positive = sq > 0
  powered = jnp.where(positive, jnp.power(jnp.where(positive, sq, 1.0), half_alpha), 0.0)
  return _common.reduce_loss(powered, reduction, mask)


@_common.keyword_only
@_common.shardable("x", "mask")
def uniformity(
    x: jax.Array,
    *,
    t: float | jax.Array = 2,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Uniformity: log of the mean Gaussian potential between distinct embeddings.

  "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
  Hypersphere" (Wang & Isola, ICML 2020):

      L_uniform = log mean_{i ≠ j} exp(−t ‖x_i − x_j‖²)        (t = 2 in the paper)

  The paper's code averages over the pairs i < j, which is the same mean. For unit vectors
  ‖x_i − x_j‖² = 2 − 2<x_i, x_j>, so with `normalize=True` this is a self-masked log-sum-exp,

      L_uniform = log Σ_i exp( LSE_{j ≠ i} 2t <x_i, x_j> ) − 2t − log(B(B − 1)),

  computed by the similarity engine `impl` without a B×B matrix (a row whose norm is below the
  normalisation eps counts as unit length there); with `axis_name` the rows' log-sum-exps run on the
  sharded engines and the outer one over the global batch. With `normalize=False` the distances are
  explicit: a dense (B, B) matrix ‖x_i‖² + ‖x_j‖² − 2<x_i, x_j> in float32, whatever `impl` says (with
  `axis_name`, this device's (B/n, B) rows against the gathered batch, for "ring" too: the formula
  needs every pair's distance). Ranges over [−4t, 0] for unit vectors; lower is more uniform.

  Args:
    x: (B, D) embeddings, B >= 2.
    t: t > 0.
    normalize: L2-normalise x first.
    reduction: "mean" only: the log of a mean over pairs has no per-sample decomposition.
    mask: None or bool (B,): False marks padding rows, left out of every pair (B is then the number of
      valid rows; 0 when fewer than two are valid).
    impl: similarity engine, see `jaxcl.ops.available_impls()`; "allgather" | "ring" with `axis_name` /
      `mesh`: the batch split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32 (the same on every device under `axis_name`).

  >>> import jax.numpy as jnp
  >>> float(uniformity(jnp.eye(2)))  # one pair at squared distance 2: log exp(-2 * 2)
  -4.0
  """
  x = _checks.check_array("x", x, ndim=2)
  _common.check_global_batch("x", x, 2, axis_name, why="uniformity averages over pairs i != j")
  _checks.check_positive("t", t)
  _common.check_reduction(reduction, per_anchor=False)
  b = x.shape[0]
  mask = _common.sample_mask(mask, b)
  t = jnp.asarray(t, jnp.float32)
  if mask is None:
    n_global = _common.global_size(b, axis_name)
    log_pairs = math.log(n_global * (n_global - 1))
  else:  # fewer than two valid rows: no pair, the loss is 0
    n = _common.batch_sum(mask.astype(jnp.float32), axis_name)
    enough = n >= 2
    log_pairs = jnp.log(jnp.where(enough, n * (n - 1.0), 1.0))
  ids = _common.batch_ids(b, axis_name)
  if normalize:
    z = _common.l2_normalize(x)
    rows = ops.logsumexp(z, z, scale=2.0 * t, exclude=(ids, ids), row_valid=mask, col_valid=mask,
                         impl=impl, axis_name=axis_name).rows
    value = _masked_logsumexp(rows, mask, axis_name) - 2.0 * t - log_pairs
  else:
    if axis_name is None:
      ops.resolve_impl(impl, b, b)  # validates `impl`; the explicit-distance form is dense
      keys, key_mask = x, mask
    else:
      _checks.check_choice("impl", impl, ("auto",) + SHARDED_IMPLS)
      keys = jax.lax.all_gather(x, axis_name, tiled=True)  # every pair's distance: the keys gathered
      key_mask = None if mask is None else jax.lax.all_gather(mask, axis_name, tiled=True)
    gram = jnp.einsum("id,jd->ij", x, keys, preferred_element_type=jnp.float32)
    row_norms = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1)
    key_norms = jnp.sum(jnp.square(keys.astype(jnp.float32)), axis=1)
    sq = jnp.maximum(row_norms[:, None] + key_norms[None, :] - 2.0 * gram, 0.0)
    drop = ids[:, None] == jnp.arange(keys.shape[0])[None, :]
    if mask is not None:
      drop = drop | ~(mask[:, None] & key_mask[None, :])
    value = _masked_logsumexp(jnp.where(drop, -jnp.inf, -t * sq).ravel(), None, axis_name) - log_pairs
  return value if mask is None else jnp.where(enough, value, 0.0)


def _masked_logsumexp(x: jax.Array, valid: jax.Array | None, axis_name=None) -> jax.Array:
  """log Σ exp x over the valid finite entries (of every device under `axis_name`); 0 (not -inf, and
  no NaN gradient) when there is none."""
  keep = jnp.isfinite(x) if valid is None else valid & jnp.isfinite(x)
  safe = jnp.where(keep, x, 0.0)
  m = jax.lax.stop_gradient(jnp.max(jnp.where(keep, safe, -jnp.inf), initial=-jnp.inf))
  if axis_name is not None:
    m = jax.lax.pmax(m, axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  total = _common.batch_sum(jnp.where(keep, jnp.exp(safe - m), 0.0), axis_name)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, 0.0)
