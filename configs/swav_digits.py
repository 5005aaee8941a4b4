"""SwAV on the digits: "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(Caron et al., 2020): two views swap their Sinkhorn-Knopp codes over learned prototypes, and four small
multi-crop views predict them too; the SimCLR recipe's encoder, optimizer, batch and steps otherwise
(configs/simclr_digits.py)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "swav"
  c.loss.name = "swav"
  c.loss.temperature = 0.1  # τ of the predicted assignments (the paper's)
  c.swav.num_prototypes = 30  # 10 classes; about 8 samples per prototype in a batch of 256
  c.swav.epsilon = 0.05
  c.swav.freeze_prototypes_steps = 6  # about one epoch of the 1,438 training digits
  c.swav.small_crops = 4  # multi-crop: 2 views of 8x8 digits (50-100 % crops) and 4 of 5x5 (20-50 %)
  c.swav.small_crop_size = 5
  c.swav.small_crop_scale = (0.2, 0.5)
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
