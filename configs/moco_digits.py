"""MoCo v2 on the digits: "Improved Baselines with Momentum Contrastive Learning" (Chen et al., 2020):
EMA key encoder, a queue of negatives, InfoNCE in the MoCo form (positive + queue)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "moco"
  c.loss.name = "infonce"
  c.loss.temperature = 0.2
  c.momentum.ema = 0.99
  c.momentum.queue_size = 1024
  c.optimizer = "sgd"
  c.learning_rate = 0.06
  c.weight_decay = 5e-4
  c.total_steps = 600
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
