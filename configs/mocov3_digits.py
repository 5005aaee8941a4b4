"""MoCo v3 on the digits: "An Empirical Study of Training Self-Supervised Vision Transformers" (Chen
et al., 2021): EMA target, prediction head, symmetric InfoNCE with in-batch negatives, no queue."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "moco"
  c.loss.name = "infonce"
  c.loss.temperature = 0.2
  c.momentum.ema = 0.99
  c.momentum.queue_size = 0
  c.model.predictor_dim = 256
  c.optimizer = "lars"
  c.learning_rate = 1.0
  c.total_steps = 600
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
