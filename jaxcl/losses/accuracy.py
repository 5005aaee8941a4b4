"""In-batch retrieval accuracy: the metric logged next to a loss whose positives lie on the diagonal."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import ops
from jaxcl.losses import _common


class RetrievalAccuracy(NamedTuple):
  a_to_b: jax.Array
  b_to_a: jax.Array


@_common.keyword_only
@_common.shardable("a", "b", "mask")
def retrieval_accuracy(
    a: jax.Array,
    b: jax.Array,
    *,
    normalize: bool = True,
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> RetrievalAccuracy:
  r"""In-batch top-1 retrieval accuracy in both directions, without the (B, B) similarity matrix.

  With S_ij = <a_i, b_j> (L2-normalised first when `normalize`) and the positive of a_i being b_i:

      a_to_b = mean_i [ S_ii > max_{j ≠ i} S_ij ]      (image → text, view 1 → view 2)
      b_to_a = mean_j [ S_jj > max_{i ≠ j} S_ij ]

  A tie with a negative counts as a miss (a collapsed encoder scores 0, not 1). Computed by
  `jaxcl.ops.top1` column tile by column tile (dense for small batches); under `axis_name` / `mesh` over
  the global batch with the "allgather" / "ring" engines, as the losses are. `mask` (bool (B,)): padding
  pairs are neither queries nor candidates, and the means run over the valid ones. No gradient.

  Args:
    a, b: (B, D) row-aligned embeddings (image and text, or two views).
    impl, axis_name, mesh: as in the losses ("Sharded batches" in `jaxcl.losses`).
  Returns:
    RetrievalAccuracy(a_to_b, b_to_a): float32 fractions in [0, 1].

  >>> import jax.numpy as jnp
  >>> b = jnp.array([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])  # S = I bᵀ: rows [1 0 1], [0 1 0], [0 0 0]
  >>> [round(float(x), 4) for x in retrieval_accuracy(jnp.eye(3), b)]  # rows 0 and 2 tie: misses
  [0.3333, 0.6667]
  """
  x, y = _common.pair("a", a, "b", b, normalize=normalize, axis_name=axis_name)
  mask = _common.sample_mask(mask, x.shape[0])
  hits = ops.top1(x, y, row_valid=mask, col_valid=mask, impl=impl, axis_name=axis_name)
  fraction = lambda h: _common.reduce_loss(h.astype(jnp.float32), "mean", mask, axis_name)
  return RetrievalAccuracy(fraction(hits.rows), fraction(hits.cols))
