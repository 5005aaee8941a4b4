"""SwAV on the digits: "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(Caron et al., 2020): two views swap their Sinkhorn-Knopp codes over learned prototypes; the SimCLR
recipe's encoder, optimizer, batch and steps otherwise (configs/simclr_digits.py).

Measured on the held-out digits (200 steps, ResNet-18 width 16, seed 0; kNN / linear probe): with the
paper's multi-crop (2 + 4 crops of 8x8 and 5x5) and ε = 0.05, 0.730 / 0.877; without multi-crop 0.872 /
0.964; without multi-crop and ε = 0.03 (this recipe) 0.955 / 0.955. Crops of 6x6 from 30-60 % of the area:
0.741; 100 prototypes: 0.866 (no crops); a queue of 768 from step 50: 0.850 (no crops). An 8x8 digit
cropped smaller keeps too little of it to predict the large views' codes. Multi-crop stays a setting
(`config.swav.small_crops`, `small_crop_size`, `small_crop_scale`)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "swav"
  c.loss.name = "swav"
  c.loss.temperature = 0.1  # τ of the predicted assignments (the paper's)
  c.swav.num_prototypes = 30  # 10 classes; about 8 samples per prototype in a batch of 256
  c.swav.epsilon = 0.03  # sharper codes than the paper's 0.05 (measured above)
  c.swav.freeze_prototypes_steps = 6  # about one epoch of the 1,438 training digits
  c.swav.small_crops = 0  # no multi-crop: small crops of 8x8 digits hurt (measured above)
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
