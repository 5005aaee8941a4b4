"""Image-text methods: a `jaxcl.models.DualEncoder` (image tower + text tower, a learnable logit scale
and, for SigLIP, bias) trained on (image, caption) pairs.

- clip / siglip: the text tower is a transformer trained from scratch on token ids (`text.TokenText`);
  `config.loss.name` is "clip" ("Learning Transferable Visual Models From Natural Language
  Supervision", Radford et al., 2021) or "siglip" ("Sigmoid Loss for Language Image Pre-Training",
  Zhai et al., 2023), whichever method is named.
- lit ("LiT: Zero-Shot Transfer with Locked-image text Tuning", Zhai et al., 2022, here with the text
  side locked): the text side is the pretrained MiniLM encoder, whose embeddings arrive precomputed
  with the batch (`text.LockedText`); only the image tower and a projection are trained.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxcl import losses
from jaxcl import models
from jaxcl.train import text
from jaxcl.train.methods import base


class ImageText(base.Method):
  """(image, caption) pairs, a contrastive loss between the image and text embeddings."""

  loss_names = ("clip", "siglip")
  image_text = True

  def check(self, config):
    super().check(config)
    scale = config.loss.logit_scale_init
    if not (scale > 0 and math.isfinite(scale)):
      raise ValueError(f"`config.loss.logit_scale_init` must be a finite number > 0 (the model learns its "
                       f"logarithm), got {scale}.")

  def text_side(self, config, info):
    return text.TokenText(config, info)

  def build_model(self, config, text_side):
    m = config.model
    text_tower = models.build_model(
        m.text_encoder, vocab_size=text_side.vocab_size, width=m.text_width, depth=m.text_depth,
        heads=m.text_heads, max_len=m.text_max_len, dtype=jnp.dtype(m.dtype), remat=m.remat)
    return self.dual_encoder(config, text_tower, m.embed_dim)

  def dual_encoder(self, config, text_tower, embed_dim: int) -> models.DualEncoder:
    bias = config.loss.logit_bias_init if config.loss.name == "siglip" else None
    scale_init = math.log(config.loss.logit_scale_init)  # the model learns log(scale), CLIP-style
    return models.DualEncoder(base.build_encoder(config), text_tower, embed_dim, scale_init, bias,
                              max_logit_scale=100.0)

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    engine = base.engine_options(config, mesh)
    if config.loss.name == "clip":
      return losses.clip(outputs["image"], outputs["text"], logit_scale=outputs["logit_scale"], **engine), state, {}
    return losses.siglip(outputs["image"], outputs["text"], logit_scale=outputs["logit_scale"],
                         logit_bias=outputs["logit_bias"], **engine), state, {}

  def positive_pairs(self, outputs, extras):
    return outputs["image"], outputs["text"], ("accuracy_image_to_text", "accuracy_text_to_image")


class CLIP(ImageText):
  name = "clip"


class SigLIP(ImageText):
  name = "siglip"


class LiT(ImageText):
  name = "lit"

  def text_side(self, config, info):
    return text.LockedText(config, info)

  def build_model(self, config, text_side):
    return self.dual_encoder(config, None, text_side.embed_dim)


base.register(CLIP())
base.register(SigLIP())
base.register(LiT())
