"""The pair-adaptive temperature network of AMCL ("Adaptive Multi-head Contrastive Learning", Wang et al.,
ECCV 2024), whose output `jaxcl.losses.amcl` takes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import losses


def amcl_pair_temperatures(phi: jax.Array, *, tau_min: float = 1e-5, tau_max: float = 2.0) -> jax.Array:
  r"""AMCL's pair temperatures from the temperature network's embeddings φ (`AMCLTemperature.embed`):

      τ(a, b) = τ_min + (τ_max − τ_min) · σ(−<φ_a, φ_b>)

  over every pair of rows a, b of `phi` (N, H, D), per head: the (H, N, N) temperatures `jaxcl.losses.amcl`
  takes (N = 2B for the rows of [z1; z2]).

  >>> import jax.numpy as jnp
  >>> tau = amcl_pair_temperatures(jnp.zeros((3, 1, 2)), tau_min=0.5, tau_max=1.5)  # σ(0) = 1/2
  >>> tau.shape, float(tau[0, 0, 1])
  ((1, 3, 3), 1.0)
  """
  phi = _checks.check_array("phi", phi, ndim=3)
  if not 0.0 < tau_min < tau_max:
    raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}.")
  scores = jnp.einsum("ahd,bhd->hab", phi.astype(jnp.float32), phi.astype(jnp.float32))
  return tau_min + (tau_max - tau_min) * jax.nn.sigmoid(-scores)


class AMCLTemperature(nn.Module):
  """The pair-adaptive temperature network of AMCL, shared by every projection head.

  τ(a, b) = τ_min + (τ_max − τ_min) · σ(−<φ(a), φ(b)>), φ a two-layer MLP (Dense → ReLU → Dense back
  to D) applied to the L2-normalised head embeddings. Similar pairs get low temperatures, dissimilar
  (uncertain) pairs high ones. Defaults follow the authors' code (LeiWangR/cl, `amcl/losses.py`
  `TemperatureHead`: τ ∈ [1e-5, 2], hidden = D; their SimCLR recipe sets hidden_dim = 128 with D = 128).

  Called on (B, H, D) embeddings z1, z2 it returns the (H, 2B, 2B) temperatures of every pair of rows of
  [z1; z2], the layout `amcl` takes. `embed(z)` is φ alone (per example: what a model computes next to
  its heads, `jaxcl.train.methods.amcl`), and `amcl_pair_temperatures` the pairwise part.

  >>> import jax, jax.numpy as jnp
  >>> z = jnp.ones((4, 2, 3))
  >>> net = AMCLTemperature()
  >>> variables = net.init(jax.random.key(0), z, z)
  >>> tau = net.apply(variables, z, z)
  >>> tau.shape
  (2, 8, 8)
  >>> phi = net.apply(variables, jnp.concatenate([z, z]), method="embed")
  >>> bool(jnp.allclose(amcl_pair_temperatures(phi), tau))
  True
  """

  hidden_dim: int | None = None
  tau_min: float = 1e-5
  tau_max: float = 2.0

  @nn.compact
  def embed(self, z: jax.Array) -> jax.Array:
    """φ(ẑ): the MLP on the L2-normalised embeddings z (..., D), float32 (..., D)."""
    z = losses.l2_normalize(jnp.asarray(z).astype(jnp.float32))
    d = z.shape[-1]
    h = nn.relu(nn.Dense(self.hidden_dim or d, name="hidden")(z))
    return nn.Dense(d, name="out")(h)

  def __call__(self, z1: jax.Array, z2: jax.Array) -> jax.Array:
    z1 = _checks.check_array("z1", z1, ndim=3)
    z2 = _checks.check_array("z2", z2, ndim=3)
    _checks.check_same_shape("z1", z1, "z2", z2)
    if not 0.0 < self.tau_min < self.tau_max:
      raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={self.tau_min}, tau_max={self.tau_max}.")
    phi = self.embed(jnp.concatenate([z1, z2], axis=0))  # (2B, H, D)
    return amcl_pair_temperatures(phi, tau_min=self.tau_min, tau_max=self.tau_max)
