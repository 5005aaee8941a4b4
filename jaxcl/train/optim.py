"""Optimizers and learning-rate schedules built from the config.

`config.optimizer` is one of "lars" (SimCLR-style large-batch SGD, "Large Batch Training of
Convolutional Networks"), "adamw" (CLIP-style) or "sgd"; the schedule is linear warmup then cosine decay.
"""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("lars", "adamw", "sgd")  # the values of `config.optimizer`


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over `warmup_steps` to `learning_rate`, cosine decay to 0 at `total_steps`.

  Counted in optimizer updates: with `grad_accum_steps = k` the optimizer updates once every k steps
  (optax.MultiSteps), so warmup and decay are divided by k.
  """
  k = max(int(config.grad_accum_steps), 1)
  total = max(int(config.total_steps) // k, 1)
  warmup = min(int(config.warmup_steps) // k, max(total - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=float(config.learning_rate),
      warmup_steps=warmup,
      decay_steps=max(total, warmup + 1),
      end_value=0.0,
  )


def learning_rate_at(config: ml_collections.ConfigDict, step):
  """The learning rate applied at training step `step` (micro-steps under gradient accumulation)."""
  return learning_rate_schedule(config)(step // max(int(config.grad_accum_steps), 1))


def _decay_mask(params):
  """Weight decay on kernels only (not on biases, norms, temperatures)."""
  import jax  # local: keeps module import light

  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and "logit" not in jax.tree_util.keystr(path), params
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config)
  name = config.optimizer
  if name == "lars":
    tx = optax.lars(
        schedule, weight_decay=config.weight_decay, weight_decay_mask=_decay_mask,
        trust_ratio_mask=_decay_mask, momentum=0.9,
    )
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=config.weight_decay,
                     mask=_decay_mask)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
                     optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f"`config.optimizer` must be one of {OPTIMIZERS}, got {name!r}.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx
