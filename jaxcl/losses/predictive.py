"""Predictive (non-contrastive) losses: a predictor output regresses a stop-gradient target."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common


@_common.keyword_only
def negative_cosine(
    p: jax.Array, z: jax.Array, *, reduction: str = "mean", mask: jax.Array | None = None
) -> jax.Array:
  r"""Negative cosine similarity between predictions and stop-gradient targets (SimSiam / BYOL).

  "Exploring Simple Siamese Representation Learning" (Chen & He, CVPR 2021):

      D(p, z) = mean_i −<p_i, sg(z_i)> / (‖p_i‖ ‖z_i‖)

  sg is `jax.lax.stop_gradient`: no gradient reaches `z`. Norms are floored at 1e-6, so a zero vector
  has cosine 0. The symmetric SimSiam loss is ½ D(p1, z2) + ½ D(p2, z1); the BYOL loss
  ("Bootstrap Your Own Latent", Grill et al., 2020) is 2 + 2 D(p, z'), z' from the momentum target.
  Computed in float32 for any input dtype.

  Args:
    p: (B, D) predictor outputs.
    z: (B, D) targets, row-aligned with `p`.
    reduction: "mean", "sum" or "none" (the (B,) −cosines).
    mask: None or bool (B,): False marks padding pairs, left out.
  Returns:
    Scalar float32 mean in [−1, 1], or (B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> p = jnp.eye(2)
  >>> float(negative_cosine(p, jnp.array([[1.0, 0.0], [1.0, 0.0]])))  # cosines 1 and 0
  -0.5
  """
  p = _checks.check_array("p", p, ndim=2)
  z = _checks.check_array("z", z, ndim=2)
  _checks.check_same_shape("p", p, "z", z)
  _checks.check_min_batch("p", p, 1, why="the mean needs a pair")
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, p.shape[0])
  p = _common.l2_normalize(p.astype(jnp.float32))
  z = _common.l2_normalize(jax.lax.stop_gradient(z).astype(jnp.float32))
  return _common.reduce_loss(-_common.rowwise_dot(p, z), reduction, mask)
