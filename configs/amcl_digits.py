"""AMCL on the digits: "Adaptive Multi-head Contrastive Learning" (Wang, Koniusz, Gedeon & Zheng, ECCV
2024): H = 3 projection heads and a pair-adaptive temperature network trained with the encoder
(`config.amcl.*`: the authors' SimCLR recipe); the SimCLR recipe's encoder, optimizer and budget otherwise
(configs/simclr_digits.py), so the two compare at the same cost.

Measured once (200 steps, ResNet-18 width 16, seed 0, this 2-core CPU; the settings of README's reproductions):
kNN 0.900, linear probe 0.955, against 0.925 / 0.961 for simclr_digits. The logged loss runs to large negative
values (about -1.4e5 by step 200): with the top-k form and a positive closer than the negatives, the objective
falls as the temperatures shrink, down to τ_min = 1e-5 (the authors' range; their runs clip the gradient norm
at 1, here LARS scales each layer's update)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "amcl"
  c.loss.name = "amcl"
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
