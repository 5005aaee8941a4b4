"""SimCLR on the bundled scikit-learn digits: the default recipe (a few minutes on a 2-core CPU).

"A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., 2020):
two augmented views, ResNet encoder, MLP projection, NT-Xent, LARS with warmup + cosine.
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "simclr"
  c.loss.name = "nt_xent"
  c.loss.temperature = 0.2
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
