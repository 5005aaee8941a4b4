"""Helpers shared by the loss modules: L2 normalisation, temperatures, positive logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks

NORM_EPS = 1e-6


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """x / max(‖x‖₂, eps), computed in float32 and returned in x's dtype (gradients flow through)."""
  x32 = x.astype(jnp.float32)
  sq = jnp.sum(x32 * x32, axis=axis, keepdims=True)
  return (x32 * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def maybe_normalize(x: jax.Array, normalize: bool) -> jax.Array:
  return l2_normalize(x) if normalize else x


def embeddings(name: str, x, *, normalize: bool = True, min_batch: int = 2, why: str = "") -> jax.Array:
  """Validates a (B, D) float embedding batch and L2-normalises it if asked."""
  x = _checks.check_array(name, x, ndim=2)
  if min_batch:
    _checks.check_min_batch(name, x, min_batch, why=why or "a contrastive loss needs a negative")
  return maybe_normalize(x, normalize)


def pair(name_a: str, a, name_b: str, b, *, normalize: bool = True, why: str = ""):
  """Validates two (B, D) batches of the same shape and L2-normalises them if asked."""
  a = _checks.check_array(name_a, a, ndim=2)
  b = _checks.check_array(name_b, b, ndim=2)
  _checks.check_same_shape(name_a, a, name_b, b)
  _checks.check_min_batch(name_a, a, 2, why=why or "a contrastive loss needs a negative")
  return maybe_normalize(a, normalize), maybe_normalize(b, normalize)


def inverse_temperature(temperature, name: str = "temperature") -> jax.Array:
  """1 / temperature as float32, after checking that a concrete temperature is positive."""
  _checks.check_positive(name, temperature)
  return 1.0 / jnp.asarray(temperature, jnp.float32)


def logit_scale(value, name: str = "logit_scale") -> jax.Array:
  _checks.check_positive(name, value)
  return jnp.asarray(value, jnp.float32)


def rowwise_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """<a_i, b_i> per row, float32 accumulation."""
  return jnp.einsum("id,id->i", a, b, preferred_element_type=jnp.float32)
