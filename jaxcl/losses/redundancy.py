"""Redundancy-reduction losses on feature statistics over the batch: Barlow Twins and VICReg.

Both work on the (D, D) cross-correlation / covariance of the features rather than on a (B, B)
similarity matrix. Batch statistics (means, variances) are float32; the (D, D) matmul takes the inputs'
dtype with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common


def _two_views(z1, z2, why: str):
  z1 = _checks.check_array("z1", z1, ndim=2)
  z2 = _checks.check_array("z2", z2, ndim=2)
  _checks.check_same_shape("z1", z1, "z2", z2)
  _checks.check_min_batch("z1", z1, 2, why=why)
  return z1, z2, jnp.result_type(z1.dtype, z2.dtype)


def _rows(mask, reduction, n: int):
  """(w, N): w (N, 1) float32 weights of the rows (1 for real samples, 0 for padding; None without a
  mask) and the number N of real samples (a Python int without a mask)."""
  _common.check_reduction(reduction, per_anchor=False)
  mask = _common.sample_mask(mask, n)
  if mask is None:
    return None, n
  return mask.astype(jnp.float32)[:, None], jnp.sum(mask, dtype=jnp.float32)


def _centered(z: jax.Array, w, n) -> jax.Array:
  """z − mean over the real samples, 0 on the padding rows."""
  if w is None:
    return z - jnp.mean(z, axis=0)
  return w * (z - jnp.sum(w * z, axis=0) / jnp.maximum(n, 1.0))


def _feature_products(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """aᵀ b, (D, D), in `dtype` with float32 accumulation."""
  return jnp.einsum("ni,nj->ij", a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _off_diagonal_sq_sum(c: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c * c))


@_common.keyword_only
def barlow_twins(
    z1: jax.Array,
    z2: jax.Array,
    *,
    lambda_: float | jax.Array = 5e-3,
    eps: float = 1e-5,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Barlow Twins: push the cross-correlation matrix of the two views towards the identity.

  "Barlow Twins: Self-Supervised Learning via Redundancy Reduction" (Zbontar et al., ICML 2021).
  Each feature is standardised over the batch, ẑ = (z − mean_n z) / √(var_n z + eps) (population
  variance, eps inside the square root as in the authors' `BatchNorm1d(affine=False)`, so a constant
  feature gives ẑ = 0 and finite gradients), then with N the batch size:

      C = ẑ1ᵀ ẑ2 / N                                         (D × D)
      loss = Σ_i (1 − C_ii)² + λ Σ_{i ≠ j} C_ij²

  Note: this loss is a *sum* over the D² entries of C, not a mean: its scale grows with D, as in the
  paper (λ = 5e-3 for D = 8192).

  Args:
    z1, z2: (N, D) projector outputs of the two views, N >= 2.
    lambda_: λ >= 0, the weight of the redundancy-reduction (off-diagonal) term.
    eps: ε > 0 added to the variance.
    reduction: "mean" only: a loss on batch statistics has no per-sample decomposition.
    mask: None or bool (N,): False marks padding rows, left out of every batch statistic (N is then
      the number of real samples).
  Returns:
    Scalar float32.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[1.0, 2.0], [-1.0, -2.0]])  # two perfectly correlated features: C is all ones
  >>> round(float(barlow_twins(z, z)), 4)  # 0 + λ · 2
  0.01
  """
  z1, z2, dtype = _two_views(z1, z2, "batch statistics need N >= 2")
  _checks.check_non_negative("lambda_", lambda_)
  _checks.check_positive("eps", eps)
  w, n = _rows(mask, reduction, z1.shape[0])

  def standardize(z):
    centered = _centered(z.astype(jnp.float32), w, n)
    return centered * jax.lax.rsqrt(jnp.sum(centered * centered, axis=0) / n + eps)

  c = _feature_products(standardize(z1), standardize(z2), dtype) / n
  on_diagonal = jnp.sum((1.0 - jnp.diagonal(c)) ** 2)
  return on_diagonal + jnp.asarray(lambda_, jnp.float32) * _off_diagonal_sq_sum(c)


@_common.keyword_only
def vicreg(
    z1: jax.Array,
    z2: jax.Array,
    *,
    sim_coeff: float | jax.Array = 25.0,
    std_coeff: float | jax.Array = 25.0,
    cov_coeff: float | jax.Array = 1.0,
    eps: float = 1e-4,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""VICReg: invariance + variance + covariance regularisation of two views.

  "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning" (Bardes, Ponce &
  LeCun, ICLR 2022), exactly as the authors' reference code (`main_vicreg.py`). With N the batch size,
  D the feature size, z̄ = z − mean_n z and unbiased (N − 1) batch statistics:

      invariance = mean_{n,d} (z1 − z2)²                                      (MSE)
      variance   = ½ mean_d relu(1 − √(Var z1_d + ε)) + ½ mean_d relu(1 − √(Var z2_d + ε))
      covariance = Σ_{i≠j} Cov(z1)_ij² / D + Σ_{i≠j} Cov(z2)_ij² / D,    Cov(z) = z̄ᵀ z̄ / (N − 1)
      loss = sim_coeff · invariance + std_coeff · variance + cov_coeff · covariance

  Args:
    z1, z2: (N, D) expander outputs of the two views, N >= 2.
    sim_coeff, std_coeff, cov_coeff: λ, μ, ν >= 0 (25, 25, 1 in the paper).
    eps: ε > 0 inside the square root of the variance term.
    reduction: "mean" only: a loss on batch statistics has no per-sample decomposition.
    mask: None or bool (N,): False marks padding rows, left out of every batch statistic and of the
      MSE (N is then the number of real samples).
  Returns:
    Scalar float32.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[1.0, 0.0], [-1.0, 0.0]])  # dim 1 collapsed: std √1e-4 = 0.01
  >>> round(float(vicreg(z, z)), 4)  # 25 · (½ · 0.99/2 + ½ · 0.99/2)
  12.375
  """
  z1, z2, dtype = _two_views(z1, z2, "unbiased batch statistics need N >= 2")
  for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
    _checks.check_non_negative(name, value)
  _checks.check_positive("eps", eps)
  d = z1.shape[1]
  w, n = _rows(mask, reduction, z1.shape[0])
  x, y = z1.astype(jnp.float32), z2.astype(jnp.float32)
  if w is None:
    invariance = jnp.mean((x - y) ** 2)
  else:
    invariance = jnp.sum(w * (x - y) ** 2) / (jnp.maximum(n, 1.0) * d)

  def variance_and_covariance(z):
    centered = _centered(z, w, n)
    std = jnp.sqrt(jnp.sum(centered * centered, axis=0) / (n - 1) + eps)
    cov = _feature_products(centered, centered, dtype) / (n - 1)
    return jnp.mean(jax.nn.relu(1.0 - std)) / 2.0, _off_diagonal_sq_sum(cov) / d

  var_x, cov_x = variance_and_covariance(x)
  var_y, cov_y = variance_and_covariance(y)
  coeff = lambda v: jnp.asarray(v, jnp.float32)
  return (
      coeff(sim_coeff) * invariance
      + coeff(std_coeff) * (var_x + var_y)
      + coeff(cov_coeff) * (cov_x + cov_y)
  )
