"""The pair-adaptive temperature network of AMCL ("Adaptive Multi-head Contrastive Learning", Wang et al.,
ECCV 2024), whose output `jaxcl.losses.amcl` takes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import losses


class AMCLTemperature(nn.Module):
  """The pair-adaptive temperature network of AMCL, shared by every projection head.

  τ(a, b) = τ_min + (τ_max − τ_min) · σ(−<φ(a), φ(b)>), φ a two-layer MLP (Dense → ReLU → Dense back
  to D) applied to the L2-normalised head embeddings. Similar pairs get low temperatures, dissimilar
  (uncertain) pairs high ones. Defaults follow the authors' code (τ ∈ [1e-5, 2], hidden = D; their
  SimCLR recipe sets hidden_dim = 128 with D = 128).

  Called on (B, H, D) embeddings z1, z2 it returns the (H, 2B, 2B) temperatures of every pair of rows of
  [z1; z2], the layout `amcl` takes.

  >>> import jax, jax.numpy as jnp
  >>> z = jnp.ones((4, 2, 3))
  >>> net = AMCLTemperature()
  >>> tau = net.apply(net.init(jax.random.key(0), z, z), z, z)
  >>> tau.shape
  (2, 8, 8)
  """

  hidden_dim: int | None = None
  tau_min: float = 1e-5
  tau_max: float = 2.0

  @nn.compact
  def __call__(self, z1: jax.Array, z2: jax.Array) -> jax.Array:
    z1 = _checks.check_array("z1", z1, ndim=3)
    z2 = _checks.check_array("z2", z2, ndim=3)
    _checks.check_same_shape("z1", z1, "z2", z2)
    if not 0.0 < self.tau_min < self.tau_max:
      raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={self.tau_min}, tau_max={self.tau_max}.")
    d = z1.shape[-1]
    z = losses.l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32))  # (2B, H, D)
    h = nn.relu(nn.Dense(self.hidden_dim or d, name="hidden")(z))
    phi = nn.Dense(d, name="out")(h)
    scores = jnp.einsum("ahd,bhd->hab", phi, phi)
    return self.tau_min + (self.tau_max - self.tau_min) * jax.nn.sigmoid(-scores)
