"""Building blocks shared by the models: input checks, attention, the pre-LN transformer block, norms.

Compute happens in the module's `dtype` (e.g. bfloat16) with float32 parameters; attention logits and
softmax are always float32 (the matmul accumulates in float32 via `preferred_element_type`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks

Dtype = Any

# Weights of masked attention logits: finite, so that a row with nothing to attend to stays finite.
MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


def check_images(name: str, x: Any) -> jax.Array:
  """A (B, H, W, C) floating-point image batch (NHWC)."""
  x = _checks.check_array(name, x, ndim=4)
  return x


def check_tokens(name: str, tokens: Any, max_len: int | None = None) -> jax.Array:
  """A (B, L) integer token batch, 0 = padding, with L <= max_len."""
  tokens = _checks.check_array(name, tokens, ndim=2, floating=False)
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"`{name}` must be integer token ids (0 = padding), got dtype {tokens.dtype}.")
  if max_len is not None and tokens.shape[1] > max_len:
    raise ValueError(
        f"`{name}` has length {tokens.shape[1]} but the model's `max_len` is {max_len} "
        f"(shape {tokens.shape})."
    )
  return tokens


def check_heads(width: int, heads: int, name: str = "width") -> None:
  if heads <= 0 or width % heads:
    raise ValueError(f"`{name}` ({width}) must be divisible by `heads`, got heads={heads}.")


class MultiHeadAttention(nn.Module):
  """Multi-head scaled dot-product self-attention, softmax(q kᵀ / √d_h) v, with float32 softmax.

  `mask` (broadcastable to (B, heads, L, L), True = may attend) hides keys; masked logits are a large
  finite negative number, so a fully masked row gives a finite (uniform) result rather than NaN.
  """

  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    check_heads(width, self.heads)
    head_dim = width // self.heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name,
    )
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name="out",
    )(out)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) → GELU (exact, erf) → dropout → Dense(width)."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    kw = dict(
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(1e-6),
    )
    y = nn.Dense(self.mlp_dim, name="fc1", **kw)(x)
    y = jax.nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Dense(width, name="fc2", **kw)(y)


class PreLNBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) ("Attention Is All You Need",
  with the pre-norm placement of ViT, Dosovitskiy et al., 2021)."""

  heads: int
  mlp_dim: int
  dropout: float = 0.0
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    y = MultiHeadAttention(self.heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
        norm("ln1")(x), mask
    )
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = MlpBlock(
        self.mlp_dim, self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
    )(norm("ln2")(x), train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def block_class(cls: type[nn.Module], remat: bool, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`cls`, or with `remat` its rematerialised version (`flax.linen.remat`, i.e. `jax.checkpoint`): the
  block's activations are recomputed in the backward pass instead of kept from the forward, so a deep
  tower holds one block's activations at a time (activation memory ~ 1/depth, about one more forward of
  compute). `static_argnums` count `self` as 0 (a Python bool such as `train`)."""
  return nn.remat(cls, static_argnums=static_argnums) if remat else cls


NORMS = ("batch", "group", "layer")


def make_norm(
    kind: str,
    channels: int,
    *,
    train: bool,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    groups: int = 32,
    zero_scale: bool = False,
    affine: bool = True,
) -> nn.Module:
  """A normalisation layer over the last (channel) axis.

  "batch": BatchNorm with running statistics in the "batch_stats" collection (updated in train mode,
  used in eval mode); "group": GroupNorm with gcd(groups, channels) groups; "layer": LayerNorm over the
  channels. `zero_scale` initialises γ = 0 (the last norm of a residual branch, Goyal et al., 2017);
  `affine=False` drops γ and β.
  """
  _checks.check_choice("norm", kind, NORMS)
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  common = dict(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, use_scale=affine,
      use_bias=affine, name=name,
  )
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, **common)
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), **common)
  return nn.LayerNorm(**common)
