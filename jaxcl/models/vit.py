"""Vision Transformer encoders returning a pooled (B, hidden) representation (no classification head),
the final tokens, or the patch tokens as a feature map."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.models import _layers

POOLS = ("cls", "gap")


class ViT(nn.Module):
  r"""Vision Transformer: patch embedding → learned position embeddings → pre-LN blocks → LN → pool.

  "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale" (Dosovitskiy et al.,
  2021). The image is cut into non-overlapping p×p patches, each linearly embedded (a p×p stride-p
  convolution); with pool="cls" a learned [CLS] token is prepended and its final state is the output,
  with pool="gap" the output is the mean over the patch tokens (no [CLS] token). Position embeddings
  are learned, one per token, for the image size seen at `init`.

      z_0 = [x_cls; x_1 E; …; x_N E] + E_pos
      z_l = z'_l + MLP(LN(z'_l)),   z'_l = z_{l−1} + MSA(LN(z_{l−1}))
      y   = LN(z_L)[cls]   or   mean_n LN(z_L)[n]

  Attributes:
    patch_size: p (image height and width must be multiples of it).
    hidden: token width D. depth: number of blocks. heads: attention heads (D % heads == 0).
    mlp_dim: hidden size of the block MLPs (4·D in the standard configs).
    pool: "cls" or "gap".
    dropout: dropout rate on the embeddings and residual branches (train mode only; needs a "dropout"
      rng when > 0).
    dtype: compute dtype; parameters are `param_dtype` (float32).
    remat: recompute each block's activations in the backward pass (`jax.checkpoint`) instead of
      keeping them: activation memory of about one block instead of `depth`, for about one more forward.

  Methods (each with the parameters of `__call__`; call as `apply(variables, x, method="...")`):
  `tokens(x, train)` is LN(z_L), the (B, 1 + N, D) final tokens ([CLS] first with pool="cls") or
  (B, N, D); `feature_map(x, train)` is its N = h·w patch tokens as a (B, h, w, D) grid, h = H / p and
  w = W / p in row-major patch order (without the [CLS] token), for the dense objectives of
  `jaxcl.losses.spatial`. With pool="gap", `__call__` is the mean of the feature map.

  >>> import jax, jax.numpy as jnp
  >>> model = ViT(patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=16)
  >>> x = jnp.ones((2, 8, 8, 3))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> model.apply(variables, x, train=False).shape
  (2, 8)
  >>> model.apply(variables, x, train=False, method="feature_map").shape
  (2, 2, 2, 8)
  """

  patch_size: int
  hidden: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "cls"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ln_eps: float = 1e-6
  remat: bool = False

  @property
  def output_dim(self) -> int:
    return self.hidden

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, D): the final [CLS] token (pool="cls") or the mean of the patch tokens (pool="gap")."""
    x = self.tokens(x, train)
    if self.pool == "cls":
      return x[:, 0]
    return jnp.mean(x, axis=1).astype(self.dtype)

  def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H / p, W / p, D): the final patch tokens of the (B, H, W, C) images `x` on their grid."""
    tokens = self.tokens(x, train)  # checks x first
    b, h, w = jnp.shape(x)[:3]
    if self.pool == "cls":
      tokens = tokens[:, 1:]
    return jnp.reshape(tokens, (b, h // self.patch_size, w // self.patch_size, self.hidden))

  @nn.compact
  def tokens(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, [1 +] N, D): LN(z_L), every final token ([CLS] first with pool="cls")."""
    _checks.check_choice("pool", self.pool, POOLS)
    _layers.check_heads(self.hidden, self.heads, name="hidden")
    x = _layers.check_images("x", x)
    image_shape = x.shape
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f"`x` height and width must be multiples of `patch_size`={p}, got shape {x.shape}."
      )
    x = nn.Conv(
        self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.lecun_normal(), name="patch_embed",
    )(x)
    x = jnp.reshape(x, (b, -1, self.hidden))
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden)), x], axis=1)
    n_tokens = x.shape[1]
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape[1]
      if stored != n_tokens:
        raise ValueError(
            f"`x` of shape {image_shape} gives {n_tokens} tokens but the position embeddings were "
            f"initialised for {stored}: apply the model at the image size used for `init`."
        )
    pos = self.param(
        "pos_embedding", nn.initializers.normal(0.02), (1, n_tokens, self.hidden), self.param_dtype
    )
    x = x + pos.astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    block = _layers.block_class(_layers.PreLNBlock, self.remat, static_argnums=(3,))
    for i in range(self.depth):
      x = block(
          self.heads, self.mlp_dim, self.dropout, ln_eps=self.ln_eps, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"block{i}",
      )(x, None, train)
    x = nn.LayerNorm(
        epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm"
    )(x)
    return x


def _config(name, hidden, depth, heads):
  fn = functools.partial(ViT, patch_size=16, hidden=hidden, depth=depth, heads=heads, mlp_dim=4 * hidden)
  fn.__doc__ = (
      f"{name}: ViT with hidden={hidden}, depth={depth}, heads={heads}, mlp_dim={4 * hidden}; "
      "patch_size 16 unless given."
  )
  return fn


ViT_Ti = _config("ViT-Ti", 192, 12, 3)
ViT_S = _config("ViT-S", 384, 12, 6)
ViT_B = _config("ViT-B", 768, 12, 12)
