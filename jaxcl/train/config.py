"""Shared defaults of every recipe in configs/: a recipe's `get_config()` starts from `base_config()`.

Every key a recipe may set exists here, so a typo on the command line (`--config.batchsize=...`) is an
error from ml_collections instead of a silently ignored setting.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256  # global batch (all processes)
  c.total_steps = 1000
  c.learning_rate = 0.3
  c.warmup_steps = 50
  c.weight_decay = 1e-6
  c.optimizer = "lars"  # lars | adamw | sgd
  c.grad_clip_norm = 0.0  # 0: off
  c.grad_accum_steps = 1
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.eval_every = 500
  c.log_every = 50
  c.on_nonfinite = "stop"  # stop | skip

  c.method = "simclr"  # simclr | dcl | supcon | multiview | moco | byol | simsiam | clip | siglip | lit
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "nt_xent"  # any jaxcl.losses function the method supports
  c.loss.temperature = 0.2
  c.loss.impl = "auto"
  c.loss.sigma = 0.5  # dclw
  c.loss.logit_scale_init = 1 / 0.07  # clip / siglip / lit (learnable, log-parameterised)
  c.loss.logit_bias_init = -10.0  # siglip
  c.num_views = 2

  c.momentum = ml_collections.ConfigDict()  # moco / byol target network
  c.momentum.ema = 0.99
  c.momentum.queue_size = 0  # moco v2: > 0 (MoCo queue); moco v3: 0 (in-batch negatives)

  c.model = ml_collections.ConfigDict()
  c.model.encoder = "resnet18"  # see jaxcl.models.build_model
  c.model.width = 32
  c.model.small_image = True
  c.model.norm = "batch"
  c.model.projection_dims = (256, 128)  # hidden..., output
  c.model.predictor_dim = 0  # > 0: a prediction head (byol, simsiam, moco v3)
  c.model.text_encoder = "text_transformer"  # clip / siglip: trained text tower
  c.model.text_width = 128
  c.model.text_depth = 2
  c.model.text_heads = 4
  c.model.text_max_len = 16
  c.model.embed_dim = 128  # image-text joint space
  c.model.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | tfds | folder
  c.data.data_dir = "~/.cache/jaxcl/tfds"
  c.data.tfds_name = ""
  c.data.folder = ""
  c.data.captions_file = ""
  c.data.image_size = 0  # 0: native size
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.worker_count = 0

  c.augment = ml_collections.ConfigDict()
  c.augment.strength = "digits"  # see jaxcl.data.augment.default_aug_config

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis (-1: all that remain)
  c.mesh.fsdp = 1  # devices sharding the parameters (FSDP)

  c.eval = ml_collections.ConfigDict()
  c.eval.knn_k = 200
  c.eval.knn_temperature = 0.1
  c.eval.linear_probe = True
  c.eval.baselines = True
  return c
