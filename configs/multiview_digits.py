"""Multi-view contrastive learning on the digits: V augmented views per image with MV-InfoNCE ("A
Principled Framework for Multi-View Contrastive Learning"); `--config.loss.name=mv_dhel` or
`pairwise_nt_xent` (the average over view pairs) for the alternatives."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "multiview"
  c.loss.name = "multiview_infonce"
  c.loss.temperature = 0.2
  c.num_views = 4
  c.batch_size = 128
  c.total_steps = 600
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
