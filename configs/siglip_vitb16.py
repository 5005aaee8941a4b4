"""SigLIP at paper scale: "Sigmoid Loss for Language Image Pre-Training" (Zhai et al., 2023), ViT-B/16
image tower at 224 px and a 12-layer, 512-wide, 8-head
text transformer (64 tokens), 512-d joint space, the pairwise sigmoid loss with a learnable scale and
bias (init 10 and −10), AdamW (learning rate 1e-3, weight decay 1e-4), batch 32768, bfloat16 compute.

Data as in configs/clip_vitb16.py: a prepared tfds dataset in `config.data.data_dir` (ImageNet-1k by
default, captions from class names and templates; the paper's WebLI pairs are not a tfds dataset). Plan
it first:

    python -m jaxcl.plan --config=configs/siglip_vitb16.py --topology=v5e:8x8
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "siglip"
  c.loss.name = "siglip"
  c.loss.logit_scale_init = 10.0
  c.loss.logit_bias_init = -10.0
  c.model.encoder = "vit_b"  # patch 16
  c.model.text_width = 512
  c.model.text_depth = 12
  c.model.text_heads = 8
  c.model.text_max_len = 64
  c.model.embed_dim = 512
  c.model.dtype = "bfloat16"
  c.model.remat = True  # gradient checkpointing: block activations recomputed in the backward pass
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-4
  c.batch_size = 32768
  c.total_steps = 32 * 1281167 // 32768  # 32 epochs of ImageNet-1k
  c.warmup_steps = 125
  c.checkpoint_every = 100
  c.eval_every = 1000
  c.log_every = 10
  c.async_checkpointing = True
  c.augment.strength = "simclr"
  c.data.name = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.image_size = 224
  c.data.eval_split = "validation"
  c.data.num_classes = 1000  # declared for jaxcl.plan; checked against the data when a run opens it
  c.data.num_examples = 1281167
  c.data.worker_count = 16
  c.data.transfer_dtype = "uint8"  # a quarter of the bytes of float32 (resized images rounded to 8 bits)
  c.eval.linear_probe = False
  c.eval.baselines = False
  return c
