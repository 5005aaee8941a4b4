"""SimSiam: "Exploring Simple Siamese Representation Learning" (Chen & He, 2021): each view's prediction
regresses the other view's projection, under a stop-gradient (in `losses.negative_cosine`); no negatives,
no target network."""

from __future__ import annotations

from jaxcl import losses
from jaxcl.train.methods import base


class SimSiam(base.ViewsMethod):
  name = "simsiam"
  loss_names = ("negative_cosine",)
  needs_predictor = True

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    p, z = outputs["prediction"], outputs["projection"]
    return 0.5 * (losses.negative_cosine(p[0], z[1]) + losses.negative_cosine(p[1], z[0])), state, {}


base.register(SimSiam())
