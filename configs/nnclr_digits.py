"""NNCLR on the digits: "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations" (Dwibedi et al., 2021): each view's nearest neighbour in a support set of earlier
projections is the anchor for the other view's prediction; the SimCLR recipe's encoder, optimizer and
budget otherwise (configs/simclr_digits.py), so the two compare at the same cost."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "nnclr"
  c.loss.name = "nnclr"
  c.loss.temperature = 0.1  # the paper's τ
  c.model.predictor_dim = 512  # the paper's prediction head (4096 wide at ImageNet scale)
  c.nnclr.support_size = 1024  # 4 batches of 256: the digits' train split holds about 1,400 images
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
