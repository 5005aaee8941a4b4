"""DCL on the digits: "Decoupled Contrastive Learning" (Yeh et al., 2022): NT-Xent without the positive
in the denominator (`--config.loss.name=dclw` for the weighted variant)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "dcl"
  c.loss.name = "dcl"
  c.loss.temperature = 0.1
  c.total_steps = 600
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
