"""Image–text dual encoder with a learnable temperature (CLIP) and bias (SigLIP)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks

# CLIP: logit scale exp(t) initialised to 1/0.07. SigLIP: exp(t) = 10, bias −10.
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


class DualEncoder(nn.Module):
  r"""Two towers and linear projections into a shared space, plus a learnable logit scale and bias.

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021) and
  "Sigmoid Loss for Language Image Pre-Training" (Zhai et al., 2023). The temperature is learned in log
  space, t = `logit_scale` parameter, and used as the multiplier exp(t) of the similarities:

      image = W_i · f(x),   text = W_t · g(tokens),   logit_scale = exp(t),   logit_bias = b

  CLIP: t₀ = log(1/0.07) (the default), no bias. SigLIP: t₀ = log 10, b₀ = −10
  (`SIGLIP_LOGIT_SCALE_INIT`, `SIGLIP_LOGIT_BIAS_INIT`). The embeddings are returned unnormalised (the
  losses normalise them). `max_logit_scale` caps exp(t) in the forward pass (CLIP clips at 100).

  Attributes:
    image_encoder: module called as `image_encoder(x, train=train)` → (B, F_i).
    text_encoder: module called as `text_encoder(tokens, train=train)` → (B, F_t); or None for a
      locked text tower whose embeddings arrive precomputed (LiT): the text input is then the (B, E)
      embedding itself, used as is (no projection), and the image side maps into its space.
    embed_dim: E, the shared embedding size.
    logit_scale_init: t₀, the initial *log* of the logit scale.
    logit_bias_init: b₀, or None for no bias parameter.
    max_logit_scale: optional cap on exp(t).
    match_head: optional module called as `match_head(anchor, data)` → (N, 2) logits on pairs of (N, E)
      text and image embeddings (GRAM's data–anchor matching head, `MatchHead`); its parameters (under
      "match_head") are created at `init` only when it is given. `match_logits(text, image)` applies it.

  `__call__(images, tokens, train)` returns dict(image=(B, E), text=(B, E), logit_scale=(), logit_bias=()
  or None); `encode_image(images, train)` and `encode_text(tokens, train)` give one side (use
  `apply(..., method="encode_image")`). Tokens of shape (B, 1 + H, L) are each image's caption followed
  by H more texts (CE-CLIP's hard-negative captions), all through the same text tower in one call:
  `text` is the caption's embedding and `hard_negatives` (B, H, E) the others'.

  >>> import jax, jax.numpy as jnp
  >>> from jaxcl.models.mlp import MLP
  >>> model = DualEncoder(MLP((8,)), MLP((8,)), embed_dim=4)
  >>> x, t = jnp.ones((2, 3)), jnp.ones((2, 5))
  >>> out = model.apply(model.init(jax.random.key(0), x, t), x, t)
  >>> out["image"].shape, round(float(out["logit_scale"]), 3), out["logit_bias"]
  ((2, 4), 14.286, None)
  """

  image_encoder: nn.Module
  text_encoder: nn.Module | None
  embed_dim: int
  logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
  logit_bias_init: float | None = None
  max_logit_scale: float | None = None
  match_head: nn.Module | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    _checks.check_finite("logit_scale_init", self.logit_scale_init)
    if self.logit_bias_init is not None:
      _checks.check_finite("logit_bias_init", self.logit_bias_init)
    if self.max_logit_scale is not None:
      _checks.check_positive("max_logit_scale", self.max_logit_scale)
    dense = lambda name: nn.Dense(  # noqa: E731
        self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    self.image_projection = dense("image_projection")
    if self.text_encoder is not None:
      self.text_projection = dense("text_projection")
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32
    )
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32
      )

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, E) image embeddings (unnormalised)."""
    return self.image_projection(self.image_encoder(images, train=train))

  def encode_image_features(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """dict(features=(B, F_i) tower output before the projection, embedding=(B, E))."""
    features = self.image_encoder(images, train=train)
    return {"features": features, "embedding": self.image_projection(features)}

  def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """(B, E) text embeddings (unnormalised); the input itself for a locked tower (text_encoder=None)."""
    if self.text_encoder is None:
      if tokens.ndim != 2 or tokens.shape[-1] != self.embed_dim:
        raise ValueError(
            f"with `text_encoder=None` the text input must be (B, {self.embed_dim}) embeddings, got shape "
            f"{tokens.shape}."
        )
      return tokens.astype(jnp.float32)
    return self.text_projection(self.text_encoder(tokens, train=train))

  def match_logits(self, text: jax.Array, image: jax.Array) -> jax.Array:
    """(N, 2) matching logits [no match, match] of the (N, E) text and image embedding pairs (the
    `match_head`; a ValueError without one)."""
    if self.match_head is None:
      raise ValueError("`match_logits` needs the model's `match_head`, got None.")
    return self.match_head(text, image)

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    """(exp(t), b or None) as float32 scalars."""
    scale = jnp.exp(self.logit_scale)
    if self.max_logit_scale is not None:
      scale = jnp.minimum(scale, self.max_logit_scale)
    return scale, (self.logit_bias if self.logit_bias_init is not None else None)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, Any]:
    scale, bias = self.scale_and_bias()
    out = dict(image=self.encode_image(images, train=train), logit_scale=scale, logit_bias=bias)
    if self.text_encoder is not None and tokens.ndim == 3:  # (B, 1 + H, L): captions, then hard negatives
      b, k = tokens.shape[:2]
      texts = self.encode_text(tokens.reshape((b * k,) + tokens.shape[2:]), train=train)
      texts = texts.reshape((b, k) + texts.shape[1:])
      out.update(text=texts[:, 0], hard_negatives=texts[:, 1:])
    else:
      out["text"] = self.encode_text(tokens, train=train)
    if self.match_head is not None and self.is_initializing():  # create its parameters; the loss applies it
      self.match_logits(out["text"], out["image"])
    return out
