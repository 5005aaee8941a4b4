"""CLIP on the digits with captions from templates: "Learning Transferable Visual Models From Natural
Language Supervision" (Radford et al., 2021): image tower + small text transformer trained together,
symmetric softmax loss, learnable temperature (init 1/0.07), AdamW."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "clip"
  c.loss.name = "clip"
  c.loss.logit_scale_init = 1 / 0.07
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.weight_decay = 0.1
  c.batch_size = 128
  c.total_steps = 400
  c.warmup_steps = 20
  c.eval_every = 200
  c.log_every = 20
  return c
