"""Alignment and uniformity on the hypersphere (Wang & Isola): the two halves of a contrastive loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
def alignment(
    x: jax.Array,
    y: jax.Array,
    *,
    alpha: float | jax.Array = 2,
    normalize: bool = True,
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
  Returns:
    Scalar float32 mean.

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
  a = _common.maybe_normalize(x, normalize).astype(jnp.float32)
  b = _common.maybe_normalize(y, normalize).astype(jnp.float32)
  sq = jnp.sum((a - b) ** 2, axis=-1)
  half_alpha = jnp.asarray(alpha, jnp.float32) / 2.0
  positive = sq > 0
  powered = jnp.where(positive, jnp.power(jnp.where(positive, sq, 1.0), half_alpha), 0.0)
  return jnp.mean(powered)


@_common.keyword_only
def uniformity(
    x: jax.Array,
    *,
    t: float | jax.Array = 2,
    normalize: bool = True,
    impl: str = "auto",
) -> jax.Array:
  r"""Uniformity: log of the mean Gaussian potential between distinct embeddings.

  "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
  Hypersphere" (Wang & Isola, ICML 2020):

      L_uniform = log mean_{i ≠ j} exp(−t ‖x_i − x_j‖²)        (t = 2 in the paper)

  The paper's code averages over the pairs i < j, which is the same mean. For unit vectors
  ‖x_i − x_j‖² = 2 − 2<x_i, x_j>, so with `normalize=True` this is a self-masked log-sum-exp,

      L_uniform = log Σ_i exp( LSE_{j ≠ i} 2t <x_i, x_j> ) − 2t − log(B(B − 1)),

  computed by the similarity engine `impl` without a B×B matrix (a row whose norm is below the
  normalisation eps counts as unit length there). With `normalize=False` the distances are explicit:
  a dense (B, B) matrix ‖x_i‖² + ‖x_j‖² − 2<x_i, x_j> in float32, whatever `impl` says.
  Ranges over [−4t, 0] for unit vectors; lower is more uniform.

  Args:
    x: (B, D) embeddings, B >= 2.
    t: t > 0.
    normalize: L2-normalise x first.
    impl: similarity engine, see `jaxcl.ops.available_impls()`.
  Returns:
    Scalar float32.

  >>> import jax.numpy as jnp
  >>> float(uniformity(jnp.eye(2)))  # one pair at squared distance 2: log exp(-2 * 2)
  -4.0
  """
  x = _checks.check_array("x", x, ndim=2)
  _checks.check_min_batch("x", x, 2, why="uniformity averages over pairs i != j")
  _checks.check_positive("t", t)
  b = x.shape[0]
  t = jnp.asarray(t, jnp.float32)
  log_pairs = math.log(b * (b - 1))
  if normalize:
    z = _common.l2_normalize(x)
    rows = ops.logsumexp(z, z, scale=2.0 * t, exclude=ops.diagonal(b), impl=impl).rows
    return jax.nn.logsumexp(rows) - 2.0 * t - log_pairs
  ops.resolve_impl(impl, b, b)  # validates `impl`; the explicit-distance form is dense
  gram = jnp.einsum("id,jd->ij", x, x, preferred_element_type=jnp.float32)
  norms = jnp.diagonal(gram)
  sq = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
  logits = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, -t * sq)
  return jax.nn.logsumexp(logits) - log_pairs
