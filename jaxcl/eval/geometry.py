"""Geometry of an embedding space: alignment, uniformity, effective rank, modality gap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.eval import _common
from jaxcl.losses._common import l2_normalize


def _unit(name: str, x, min_rows: int = 1) -> jax.Array:
  """Validated rows, L2-normalised in float32 (distances need accurate unit norms, even for bf16)."""
  x = _common.check_embeddings(name, x, min_rows=min_rows)
  return l2_normalize(x.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _log_mean_gaussian_potential(z, t, *, chunk):
  """log mean_{i≠j} exp(−t ‖z_i − z_j‖²) for unit rows z, one (chunk, N) block at a time."""
  n = z.shape[0]

  def row_lse(rows):
    zi, i = rows
    s = jnp.einsum("cd,nd->cn", zi, z, preferred_element_type=jnp.float32)
    sq_dist = jnp.maximum(2.0 - 2.0 * s, 0.0)  # ‖a − b‖² for unit a, b
    off_diagonal = i[:, None] != jnp.arange(n)[None, :]
    return jax.nn.logsumexp(jnp.where(off_diagonal, -t * sq_dist, -jnp.inf), axis=1)

  lse = _common.map_chunks(row_lse, (z, jnp.arange(n)), chunk)
  return jax.nn.logsumexp(lse) - jnp.log(n * (n - 1.0))


def alignment_uniformity(
    x: jax.Array,
    y: jax.Array,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    chunk: int = 1024,
) -> dict[str, jax.Array]:
  r"""Alignment of positive pairs and uniformity on the hypersphere (lower is better for both).

  "Understanding Contrastive Representation Learning through Alignment and Uniformity on the
  Hypersphere" (Wang & Isola, ICML 2020). With x̂, ŷ the L2-normalised rows ((x_i, y_i) a positive
  pair, e.g. two views or an image and its caption):

      alignment  = (1/N) Σ_i ‖x̂_i − ŷ_i‖₂^α
      uniformity = ½ [ U(x̂) + U(ŷ) ],   U(z) = log (1/(N(N−1))) Σ_{i≠j} exp(−t ‖z_i − z_j‖²₂)

  (the mean over ordered pairs i ≠ j equals the paper's mean over pairs i < j). Uniformity lies in
  [−4t, 0]; it is computed `chunk` rows at a time, never forming the N × N distance matrix.

  Args:
    x, y: (N, D) paired embeddings, N >= 2. alpha: α > 0. t: t > 0. chunk: rows per step.
  Returns:
    {"alignment": float32 scalar, "uniformity": float32 scalar}.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  >>> out = alignment_uniformity(x, x, t=1.0)
  >>> float(out["alignment"]), float(out["uniformity"])  # identical views; antipodal: log e^-4
  (0.0, -4.0)
  """
  x = _unit("x", x, min_rows=2)
  y = _unit("y", y, min_rows=2)
  _checks.check_same_shape("x", x, "y", y)
  _checks.check_positive("alpha", alpha)
  _checks.check_positive("t", t)
  chunk = _common.check_positive_int("chunk", chunk)
  sq = jnp.sum(jnp.square(x - y), axis=1)
  alignment = jnp.mean(sq ** (jnp.asarray(alpha, jnp.float32) / 2))
  t = jnp.asarray(t, jnp.float32)
  uniformity = 0.5 * (
      _log_mean_gaussian_potential(x, t, chunk=chunk) + _log_mean_gaussian_potential(y, t, chunk=chunk)
  )
  return {"alignment": alignment, "uniformity": uniformity}


def effective_rank(x: jax.Array) -> jax.Array:
  r"""Effective rank of a matrix: exp of the Shannon entropy of its normalised singular values.

  "The effective rank: A measure of effective dimensionality" (Roy & Vetterli, EUSIPCO 2007); applied
  to embeddings as RankMe ("RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
  Representations by Their Rank", Garrido et al., 2023). With σ_1..σ_K the singular values of x:

      p_k = σ_k / Σ_l σ_l,      erank(x) = exp( −Σ_k p_k log p_k )    (0 log 0 = 0)

  1 <= erank <= rank(x): n for an n×n identity, 1 for a rank-1 matrix; 0 for the zero matrix (by
  convention). The SVD runs in float32; the rows are used as given (not centred or normalised).

  >>> import jax.numpy as jnp
  >>> round(float(effective_rank(jnp.diag(jnp.array([1.0, 1.0, 0.0])))), 4)
  2.0
  """
  x = _common.check_embeddings("x", x).astype(jnp.float32)
  sigma = jnp.linalg.svd(x, compute_uv=False)
  total = jnp.sum(sigma)
  p = sigma / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def modality_gap(x: jax.Array, y: jax.Array) -> jax.Array:
  r"""Distance between the centroids of two sets of L2-normalised embeddings.

  "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive Representation Learning"
  (Liang et al., NeurIPS 2022):

      gap = ‖ (1/N) Σ_i x̂_i − (1/M) Σ_j ŷ_j ‖₂        (in [0, 2])

  x (N, D) and y (M, D) need not be paired or of equal size.

  >>> import jax.numpy as jnp
  >>> round(float(modality_gap(jnp.array([[3.0, 0.0]]), jnp.array([[0.0, 1.0], [0.0, 2.0]]))), 4)
  1.4142
  """
  x = _unit("x", x)
  y = _unit("y", y)
  _common.check_same_dim("x", x, "y", y)
  return jnp.linalg.norm(jnp.mean(x, axis=0) - jnp.mean(y, axis=0))
