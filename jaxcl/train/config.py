"""Shared defaults of every recipe in configs/: a recipe's `get_config()` starts from `base_config()`.

Every key a recipe may set exists here, so a typo on the command line (`--config.batchsize=...`) is an
error from ml_collections instead of a silently ignored setting. The settings of one method live in
that method's own sections (`Method.config_sections`: `config.momentum` of moco and byol,
`config.isogclr` and `config.mcl` of simclr, `config.isogclr_clip`, `config.ce_clip` and `config.gram` of clip,
`config.sentence` of simcse), merged in here from every registered method.
"""

import ml_collections
from ml_collections.config_dict import placeholder


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
  # k > 1: gradient caching (jaxcl.grad_cache): the encoders run k chunks of each device's batch at a
  # time (activations ~1/k, one more forward) while the loss keeps every negative of the global batch.
  c.grad_cache_chunks = 1
  # True: the chunk loops written out (same memory, k times the compile time): XLA:CPU runs convolution
  # gradients ~10x slower inside a loop, so convolutional encoders on CPU want it; TPU and GPU do not.
  c.grad_cache_unroll = False
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  # False: a save completes before training goes on, so a kill -9 loses at most checkpoint_every steps.
  # True: orbax writes in the background (faster for big models), but a kill during a write falls back
  # to the checkpoint before it: up to 2 × checkpoint_every steps lost.
  c.async_checkpointing = False
  c.eval_every = 500
  c.log_every = 50
  c.on_nonfinite = "stop"  # stop | skip a step whose loss, gradient or updated state is not finite

  c.method = "simclr"  # simclr | dcl | supcon | multiview | moco | byol | simsiam | clip | siglip | lit | simcse
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "nt_xent"  # any jaxcl.losses function the method supports
  c.loss.temperature = 0.2
  c.loss.impl = "auto"
  # The pallas engine's settings (`jaxcl.ops.pallas.Settings`, docs/pallas.md) with impl = "pallas".
  # None: the process default (the JAXCL_PALLAS_* environment variables, read at import).
  # (Typed placeholders, so that `--config.loss.pallas.block_rows=512` parses on the command line.)
  c.loss.pallas = ml_collections.ConfigDict()
  c.loss.pallas.flavour = placeholder(str)  # auto | tpu | gpu
  c.loss.pallas.interpret = placeholder(object)  # auto | True | False | tpu
  c.loss.pallas.block_rows = placeholder(int)  # tile sizes along the rows / columns of S
  c.loss.pallas.block_cols = placeholder(int)
  c.loss.pallas.num_warps = placeholder(int)  # Triton only
  c.loss.pallas.num_stages = placeholder(int)  # Triton only
  c.loss.pallas.max_fused_cols = placeholder(int)  # TPU only
  c.loss.pallas.fused_backward = placeholder(bool)  # one backward kernel for dq and dk (GPU: dk by atomics)
  c.loss.pallas.fused_backward_vmem = placeholder(int)  # TPU only: VMEM bytes of one fused backward call
  c.loss.sigma = 0.5  # dclw
  c.loss.logit_scale_init = 1 / 0.07  # clip / siglip / lit (learnable, log-parameterised)
  c.loss.logit_bias_init = -10.0  # siglip
  c.num_views = 2

  c.model = ml_collections.ConfigDict()
  c.model.encoder = "resnet18"  # see jaxcl.models.build_model
  c.model.width = 32  # resnet* only (base channel width), like small_image
  c.model.small_image = True
  c.model.norm = "batch"
  c.model.projection_dims = (256, 128)  # hidden..., output
  c.model.predictor_dim = 0  # > 0: a prediction head (byol, simsiam, moco v3)
  c.model.text_encoder = "text_transformer"  # clip / siglip: trained text tower
  c.model.text_width = 128
  c.model.text_depth = 2
  c.model.text_heads = 4
  c.model.text_max_len = 16  # tokens per caption (per sentence for simcse)
  c.model.embed_dim = 128  # image-text joint space
  c.model.dtype = "float32"
  c.model.remat = False  # recompute block activations in the backward pass (resnet*, vit*, text tower)

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | tfds | folder | docstrings (sentence pairs, text only)
  c.data.data_dir = "~/.cache/jaxcl/tfds"
  c.data.tfds_name = ""
  c.data.folder = ""
  c.data.captions_file = ""
  c.data.image_size = 0  # 0: native size
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.worker_count = 0
  # The dtype images travel in from the host to the devices (jaxcl.train.devices.encode_images): float32,
  # or uint8 (a quarter of the bytes in device memory and over the host link; exact for 8-bit images at
  # their stored size, such as the bundled digits; images a source resizes are rounded to the nearest of
  # 256 levels, at most 0.5/255 off, as in any uint8 image pipeline).
  c.data.transfer_dtype = "float32"

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
  # False: the run ends with its last checkpoint and no evaluation (no baselines, no embedding plot;
  # results.json holds the step): a pretraining run evaluated later, or elsewhere.
  c.eval.at_end = True
  for name, section in _method_sections().items():
    c[name] = section
  return c


def _method_sections() -> dict[str, ml_collections.ConfigDict]:
  from jaxcl.train import methods  # pylint: disable=import-outside-toplevel  (the methods import jax)

  return methods.config_sections()


# Keys a data config may carry beyond base_config(): the tfds feature names (read by jaxcl.data.sources
# for tfds datasets), and what a recipe declares about its data so that `jaxcl.plan` can compile it
# without the data (`sources.abstract_info`; checked against the data when a run opens it).
OPTIONAL_KEYS = ("data.image_key", "data.label_key", "data.caption_key", "data.num_classes",
                 "data.num_examples", "data.channels")


def _flatten(d, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out[path] = dict  # a section
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _type_name(value) -> str:
  return type(value).__name__


def _compatible(value, default) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):  # of ints, or of numbers when the default holds a float
    kinds = (int, float) if any(isinstance(v, float) for v in default) else (int,)
    return isinstance(value, (tuple, list)) and all(
        isinstance(v, kinds) and not isinstance(v, bool) for v in value)
  return True


def check_config_schema(config) -> None:
  """Every key of `config` exists in `base_config()` with a value of the same type, and none is missing.

  Catches what ml_collections cannot: a typo'd key set in a recipe file on an unlocked ConfigDict
  (`c.batchsize = 64`), a hand-built config with a string where a number belongs, a removed key.

  >>> c = base_config()
  >>> c.learning_rate = 1  # an int where a float is expected is fine
  >>> check_config_schema(c)
  >>> _ = c.unlock(); c.batchsize = 64
  >>> check_config_schema(c)
  Traceback (most recent call last):
  ...
  ValueError: Unknown config key `config.batchsize` (did you mean `config.batch_size`?).
  """
  import difflib  # pylint: disable=import-outside-toplevel

  expected = _flatten(base_config())
  given = _flatten(config)
  for path, value in given.items():
    if path in OPTIONAL_KEYS:
      continue
    if path not in expected:
      close = difflib.get_close_matches(path, list(expected), n=1)
      hint = f" (did you mean `config.{close[0]}`?)" if close else ""
      raise ValueError(f"Unknown config key `config.{path}`{hint}.")
    default = expected[path]
    if (default is dict) != (value is dict):
      raise ValueError(
          f"`config.{path}` must be {'a section (ConfigDict)' if default is dict else 'a value'}, got "
          f"{'a section' if value is dict else repr(value)}.")
    if default is not dict and not _compatible(value, default):
      if isinstance(default, (tuple, list)):
        want = f"a tuple of {'numbers' if any(isinstance(v, float) for v in default) else 'ints'}"
      else:
        want = _type_name(default)
      raise ValueError(
          f"`config.{path}` must be {want} (like the default {default!r}), got {value!r} of type "
          f"{_type_name(value)}.")
  missing = sorted(p for p in expected if p not in given)
  if missing:
    raise ValueError(f"The config lacks the keys {['config.' + p for p in missing]}; start recipes from "
                     "`jaxcl.train.config.base_config()`.")
