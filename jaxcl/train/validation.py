"""Every check of a training config that can fail before compute starts (`validate_config`)."""

from __future__ import annotations

import ml_collections
import jax
import numpy as np

from jaxcl import models
from jaxcl.data import sources
from jaxcl.train import config as config_lib
from jaxcl.train import devices
from jaxcl.train import mcl, methods, optim


def validate_config(config: ml_collections.ConfigDict, *, data: bool = True, num_devices: int | None = None) -> dict:
  """Every check that can fail before compute starts; `train_and_evaluate` calls it first.

  The config's keys and value types against `base_config()` (unknown keys, wrong types), the method,
  value ranges, the batch size against the device and process counts, and (`data=True`) both data
  splits: the train and the evaluation source are opened, so an empty or unreadable image folder or a
  captions file with missing entries fails here, not after training. Returns {split: source info}.
  `num_devices`: the device count the batch is split over (default `jax.device_count()`; the planner
  passes the target's).
  """
  config_lib.check_config_schema(config)
  check_method(config)
  n = jax.device_count() if num_devices is None else int(num_devices)
  if config.batch_size <= 0 or config.batch_size % n:
    raise ValueError(
        f"`config.batch_size` must be a positive multiple of the device count {n}, got {config.batch_size}."
    )
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"`config.batch_size` must divide evenly over {jax.process_count()} processes, got {config.batch_size}."
    )
  for key in ("total_steps", "checkpoint_every", "eval_every", "log_every", "keep_checkpoints",
              "grad_accum_steps", "grad_cache_chunks"):
    if int(config[key]) <= 0:
      raise ValueError(f"`config.{key}` must be a positive integer, got {config[key]}.")
  check_grad_cache(config, n)
  for key in ("learning_rate", "weight_decay", "grad_clip_norm", "warmup_steps"):
    if not config[key] >= 0 or not np.isfinite(config[key]):
      raise ValueError(f"`config.{key}` must be a finite number >= 0, got {config[key]}.")
  if not 0 <= config.seed < 2**32:
    raise ValueError(f"`config.seed` must be an integer in [0, 2**32), got {config.seed}.")
  choices = {"on_nonfinite": ("stop", "skip"), "optimizer": optim.OPTIMIZERS,
             "model.dtype": ("float32", "bfloat16", "float16"), "data.name": sources.SOURCE_NAMES,
             "data.transfer_dtype": devices.TRANSFER_DTYPES}
  for path, allowed in choices.items():
    value = config
    for part in path.split("."):
      value = value[part]
    if value not in allowed:
      raise ValueError(f"`config.{path}` must be one of {allowed}, got {value!r}.")
  if not data:
    return {}
  infos = {}
  for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
    _, infos[split] = sources.build_source(config.data, split)
  shapes = {tuple(i.image_shape) for i in infos.values()}
  if len(shapes) > 1:
    raise ValueError(
        f"The train split {config.data.train_split!r} and the eval split {config.data.eval_split!r} have "
        f"different image shapes {sorted(shapes)}: set `config.data.image_size`.")
  train_info = infos[config.data.train_split]
  if methods.get(config.method).image_text and not (train_info.has_captions or train_info.num_classes):
    raise ValueError(
        f"method {config.method!r} trains on image-caption pairs, but the data {config.data.name!r} has "
        "neither captions nor class labels to make them from (for a folder: set "
        "`config.data.captions_file`, or put the images in class subfolders).")
  return infos


def check_grad_cache(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """`config.grad_cache_chunks` = k > 1 needs a method whose step is one forward of the online model
  and a loss over the batch (not an EMA target network, a queue or per-example loss state:
  `Method.grad_cache_conflict`), and k must divide each device's batch."""
  k = int(config.grad_cache_chunks)
  if k == 1:
    return
  reason = methods.get(config.method).grad_cache_conflict(config)
  if reason:
    raise ValueError(f"`config.grad_cache_chunks` = {k} does not support method {config.method!r} with "
                     f"loss {config.loss.name!r} ({reason}): set it to 1.")
  per_device = config.batch_size // num_devices
  if per_device % k:
    raise ValueError(f"`config.grad_cache_chunks` = {k} must divide each device's batch: "
                     f"`config.batch_size` {config.batch_size} over {num_devices} devices is {per_device}.")


def check_method(config: ml_collections.ConfigDict) -> None:
  """`config.method` names a registered method and the config suits it (`Method.check`: its losses,
  views, heads), no other method's config section is changed (`check_other_sections`), the MCL stage
  keys, the image encoder and the loss engine."""
  methods.get(config.method).check(config)
  check_other_sections(config)
  mcl.check_config(config)
  check_encoder(config)
  methods.check_loss_impl(config)


def check_encoder(config: ml_collections.ConfigDict) -> None:
  """`config.model.encoder` names an image encoder of `jaxcl.models.build_model`."""
  names = tuple(n for n in models.model_names() if n != "text_transformer")
  try:
    encoder = models.build_model(config.model.encoder) if isinstance(config.model.encoder, str) else None
  except (ValueError, TypeError):  # an unknown name; the text tower (it needs a vocabulary)
    encoder = None
  if encoder is None or isinstance(encoder, models.TextTransformer):
    raise ValueError(f"`config.model.encoder` must be one of {names} (an image encoder of "
                     f"jaxcl.models.build_model), got {config.model.encoder!r}.")
  if not isinstance(config.model.remat, bool):
    raise ValueError(f"`config.model.remat` must be True or False, got {config.model.remat!r}.")
  if config.model.remat and not hasattr(encoder, "remat"):
    raise ValueError(f"`config.model.remat` = True needs an encoder made of blocks (resnet*, vit*), got "
                     f"`config.model.encoder` = {config.model.encoder!r}: set it False.")


def check_other_sections(config: ml_collections.ConfigDict) -> None:
  """The config sections of other methods than `config.method` (`Method.config_sections`) keep their
  defaults: a setting the run would ignore is an error naming the key and the methods it is for."""
  own = methods.get(config.method).config_sections()
  defaults = config_lib.base_config()
  for name in methods.config_sections():
    if name in own:
      continue
    for key, value in config[name].items():
      if value != defaults[name][key]:
        raise ValueError(f"`config.{name}.{key}` = {value!r} is a setting of the methods "
                         f"{methods.section_owners(name)}, not of {config.method!r}: leave it at "
                         f"{defaults[name][key]!r}.")
