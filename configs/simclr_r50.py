"""SimCLR at paper scale: "A Simple Framework for Contrastive Learning of Visual Representations" (Chen
et al., 2020), ResNet-50 (bottleneck blocks, ImageNet stem) at 224 px, 2048-2048-128 projection head,
NT-Xent at temperature 0.1, LARS (learning rate 0.3 × batch / 256, weight decay 1e-6), batch 4096,
100 epochs with 10 of warmup, the SimCLR augmentations, bfloat16 compute.

Data: ImageNet-1k (`imagenet2012`) prepared as a tfds ArrayRecord dataset in `config.data.data_dir`
(nothing is downloaded; see jaxcl/data/tfds_source.py). Too large to train on a CPU: plan it first,

    python -m jaxcl.plan --config=configs/simclr_r50.py --topology=v5e:4x4
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "simclr"
  c.loss.name = "nt_xent"
  c.loss.temperature = 0.1
  c.model.encoder = "resnet50"
  c.model.width = 64
  c.model.small_image = False
  c.model.projection_dims = (2048, 128)
  c.model.dtype = "bfloat16"
  c.optimizer = "lars"
  c.batch_size = 4096
  c.learning_rate = 0.3 * 4096 / 256
  c.weight_decay = 1e-6
  c.total_steps = 100 * 1281167 // 4096
  c.warmup_steps = 10 * 1281167 // 4096
  c.checkpoint_every = 500
  c.eval_every = 5000
  c.log_every = 50
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
