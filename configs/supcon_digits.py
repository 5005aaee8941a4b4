"""Supervised contrastive learning on the digits: "Supervised Contrastive Learning" (Khosla et al., 2020),
L_out over two augmented views with the labels deciding the positives."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "supcon"
  c.loss.name = "supcon"
  c.loss.temperature = 0.1
  c.total_steps = 400
  c.learning_rate = 0.5
  c.warmup_steps = 20
  c.eval_every = 200
  c.log_every = 20
  return c
