"""Nearest-neighbour positives: the positive of a view is its nearest neighbour in a support set of
embeddings kept from earlier batches (NNCLR)."""

from __future__ import annotations

import jax

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common
from jaxcl.losses.infonce import infonce
from jaxcl.ops.engines import SHARDED_IMPLS


@_common.keyword_only
@_common.shardable("z", "p", "mask")
def nnclr(
    z: jax.Array,
    p: jax.Array,
    support: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""NNCLR: InfoNCE whose anchor is the nearest neighbour of a view in a support set.

  "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations"
  (Dwibedi et al., ICCV 2021), Eq. 1. With ẑ, p̂, ŝ the L2-normalised view embeddings z, the other
  view's predictions p and the support set Q (a queue of past embeddings):

      NN(z_i) = ŝ_{j*},   j* = argmax_{j ∈ Q} <ẑ_i, ŝ_j>             (no gradient)
      ℓ_i = −log exp(<NN(z_i), p̂_i>/τ) / Σ_k exp(<NN(z_i), p̂_k>/τ)

  the InfoNCE of `infonce(NN(z), p)`: the neighbour replaces the view as the anchor, the other view's
  predictions of the batch are the candidates. No gradient reaches z or the support set (the neighbour
  is a selection from a queue); p gets all of it. The paper trains the symmetric form over two views,
  ½ (nnclr(z1, p2, Q) + nnclr(z2, p1, Q)), with a prediction head, τ = 0.1 and a support set of 98,304
  projections of view 1 filled first in, first out (as in solo-learn's `NNCLR`; the authors released no
  code). The neighbour search is `jaxcl.ops.nearest` (column tiles of Q above the dense size).

  Args:
    z: (B, D) embeddings whose neighbours are looked up (view 1's projections).
    p: (B, D) the other view's predictions (or projections), row-aligned with z.
    support: (Q, D) the support set, Q >= 1; the same on every device under `axis_name`.
    temperature: τ > 0.
    normalize: L2-normalise z, p and the support set first (cosine neighbours and logits).
    reduction: "mean", "sum" or "none" (the (B,) ℓ_i, 0 where masked).
    mask: None or bool (B,): False marks padding rows (neither anchors nor candidates).
    impl: similarity engine of the InfoNCE (and of the search: a sharded engine searches locally).
    axis_name, mesh: the batch (z, p) split over devices, see "Sharded batches" in `jaxcl.losses`; the
      support set is replicated and each device searches for its own rows.
  Returns:
    Scalar float32 loss, or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> support = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> z = jnp.array([[0.9, 0.1], [0.2, 0.8]])  # neighbours: support rows 0 and 1
  >>> round(float(nnclr(z, jnp.eye(2), support, temperature=1.0)), 4)  # log(e + 1) - 1
  0.3133
  """
  z = _checks.check_array("z", z, ndim=2)
  p = _checks.check_array("p", p, ndim=2)
  _checks.check_same_shape("z", z, "p", p)
  support = _checks.check_array("support", support, ndim=2)
  if support.shape[0] < 1 or support.shape[1] != z.shape[1]:
    raise ValueError(f"`support` must have shape (Q, {z.shape[1]}) with Q >= 1 (the feature size of `z`), "
                     f"got {support.shape}.")
  _common.check_reduction(reduction)
  _common.check_global_batch("z", z, 2, axis_name, why="the other rows of p are the negatives")
  bank = _common.maybe_normalize(support, normalize)
  search_impl = "auto" if impl in SHARDED_IMPLS else impl
  index = ops.nearest(_common.maybe_normalize(z, normalize), bank, impl=search_impl).index
  neighbours = jax.lax.stop_gradient(bank[index])
  return infonce(neighbours, p, temperature=temperature, normalize=normalize, reduction=reduction,
                 mask=mask, impl=impl, axis_name=axis_name)
