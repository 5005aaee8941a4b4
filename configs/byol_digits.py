"""BYOL on the digits: "Bootstrap Your Own Latent" (Grill et al., 2020): online network with predictor
regresses the EMA target's projection of the other view (negative cosine), no negatives."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "byol"
  c.loss.name = "negative_cosine"
  c.momentum.ema = 0.99
  c.model.predictor_dim = 256
  c.learning_rate = 1.0
  c.total_steps = 600
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
