"""SigLIP on the digits with captions from templates: "Sigmoid Loss for Language Image Pre-Training"
(Zhai et al., 2023): the pairwise sigmoid loss with learnable scale (init 10) and bias (init −10)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "siglip"
  c.loss.name = "siglip"
  c.loss.logit_scale_init = 10.0
  c.loss.logit_bias_init = -10.0
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.weight_decay = 0.1
  c.batch_size = 128
  c.total_steps = 400
  c.warmup_steps = 20
  c.eval_every = 200
  c.log_every = 20
  return c
