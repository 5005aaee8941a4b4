"""CLIP at paper scale: "Learning Transferable Visual Models From Natural Language Supervision" (Radford
et al., 2021), ViT-B/16 image tower at 224 px and a 12-layer, 512-wide, 8-head causal text transformer
(77 tokens), 512-d joint space, symmetric softmax loss with a learnable temperature (init 1/0.07),
AdamW (β2 0.98, ε 1e-6, weight decay 0.2), batch 32768, bfloat16 compute.

Data: a prepared tfds dataset in `config.data.data_dir` (ArrayRecord, nothing downloaded; see
jaxcl/data/tfds_source.py), by default ImageNet-1k (`imagenet2012`) with captions made from the class names
and templates, as the training loop does for labelled data. The paper's 400M web pairs are not a tfds
dataset; the text tower's vocabulary is the loop's word vocabulary of the class names and templates, not
CLIP's 49408 BPE tokens. Too large to train on a CPU: plan it first,

    python -m jaxcl.plan --config=configs/clip_vitb16.py --topology=v5e:8x8
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "clip"
  c.loss.name = "clip"
  c.loss.logit_scale_init = 1 / 0.07
  c.model.encoder = "vit_b"  # patch 16
  c.model.text_width = 512
  c.model.text_depth = 12
  c.model.text_heads = 8
  c.model.text_max_len = 77
  c.model.embed_dim = 512
  c.model.dtype = "bfloat16"
  c.model.remat = True  # gradient checkpointing, as CLIP trained (jaxcl.plan: v5e:8x8 at 32,768, 26.65 -> 17.16 GiB temporaries per chip)
  c.optimizer = "adamw"
  c.learning_rate = 5e-4
  c.weight_decay = 0.2
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
