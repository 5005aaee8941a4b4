"""SupCon: "Supervised Contrastive Learning" (Khosla et al., 2020): two views, and every example of the
anchor's class (`batch["label"]`) is a positive."""

from __future__ import annotations

import jax.numpy as jnp

from jaxcl import losses
from jaxcl.train.methods import base


class SupCon(base.ViewsMethod):
  name = "supcon"
  loss_names = ("supcon",)

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z = jnp.swapaxes(outputs["projection"], 0, 1)  # (B, V, E)
    return losses.supcon(z, batch["label"], temperature=config.loss.temperature,
                         **base.engine_options(config, mesh)), state, {}


base.register(SupCon())
