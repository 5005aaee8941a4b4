"""On-device image augmentations for contrastive views (dm-pix, jit-able, one key per example).

The SimCLR recipe ("A Simple Framework for Contrastive Learning of Visual Representations", Chen et al.,
2020, appendix A), applied to each image x (H, W, C) float in [0, 1] in this order:

    1. random resized crop: area fraction s ~ U(crop_scale), aspect r ~ logU(crop_ratio),
       box (h, w) = (√(s·H·W/r), √(s·H·W·r)), up to 10 tries to fit (else the central box of the
       clamped aspect), offset uniform; resampled bilinearly back to (H, W), or to (S, S) with
       `output_size` S > 0 (the small views of multi-crop, SwAV)
    2. horizontal flip with probability 1/2                                   (if `flip`)
    3. colour jitter with probability jitter_prob, the four ops in random order, each clipped to [0, 1]:
       x·b, b ~ U(1−brightness, 1+brightness);  contrast c ~ U(1−contrast, 1+contrast) about the mean;
       saturation ~ U(1−saturation, 1+saturation);  hue shift ~ U(−hue, hue)
    4. grayscale (luma, kept as C channels) with probability grayscale_prob
    5. gaussian blur with probability blur_prob, σ ~ U(blur_sigma), kernel ≈ 10% of H (odd, >= 3),
       reflect padding
    6. solarize (x ← 1 − x where x >= 0.5) with probability solarize_prob (optional key; BYOL)

For C == 1 the colour-only ops (saturation, hue, grayscale) are the identity and are skipped;
brightness and contrast are well defined. Crop boxes are continuous (sub-pixel), which keeps crops of
tiny images (8x8 digits) varied.

`aug_config` is an `ml_collections.ConfigDict` (or dict) with exactly the keys of
`default_aug_config()`; an unknown or missing key is an error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks

REQUIRED_KEYS = (
    "crop_scale", "crop_ratio", "flip", "jitter_prob", "brightness", "contrast", "saturation",
    "hue", "grayscale_prob", "blur_prob", "blur_sigma",
)
OPTIONAL_KEYS = {"solarize_prob": 0.0, "output_size": 0}
CROP_ATTEMPTS = 10
_NUM_CROP = 2 * CROP_ATTEMPTS + 2
_NUM_JITTER = 8


class AugParams(NamedTuple):
  """A validated, hashable aug_config (a static argument of the jitted augmentation)."""

  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  jitter_prob: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_prob: float
  blur_prob: float
  blur_sigma: tuple[float, float]
  solarize_prob: float
  output_size: int = 0  # the side of the square output; 0: the input's (H, W)


def default_aug_config(strength: str = "simclr"):
  """The augmentation settings as a ConfigDict: "simclr" (ImageNet-style) or "digits" (8x8 digits).

  "simclr": crops of 8-100% area, aspect 3/4..4/3, flips, colour jitter 0.8/0.8/0.8/0.2 with p=0.8,
  grayscale p=0.2, blur p=0.5 with σ in [0.1, 2.0] (SimCLR, colour strength s=1).
  "digits": no flip (a mirrored digit is another symbol), crops of 50-100%, brightness/contrast 0.4
  with p=0.8 and no colour ops, light blur p=0.2 with σ in [0.1, 0.8].

  >>> cfg = default_aug_config("digits")
  >>> cfg.flip, tuple(cfg.crop_scale), cfg.saturation
  (False, (0.5, 1.0), 0.0)
  """
  import ml_collections  # pylint: disable=import-outside-toplevel

  _checks.check_choice("strength", strength, ("simclr", "digits"))
  if strength == "simclr":
    values = dict(
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, jitter_prob=0.8,
        brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, grayscale_prob=0.2, blur_prob=0.5,
        blur_sigma=(0.1, 2.0), solarize_prob=0.0,
    )
  else:
    values = dict(
        crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=False, jitter_prob=0.8,
        brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.2,
        blur_sigma=(0.1, 0.8), solarize_prob=0.0,
    )
  return ml_collections.ConfigDict(values)


def _range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = True
) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"`aug_config.{name}` must be a pair (min, max), got {value!r}.") from None
  bad_low = a <= low if low_open else a < low
  if bad_low or b > high or a > b:
    raise ValueError(
        f"`aug_config.{name}` must satisfy {low} {'<' if low_open else '<='} min <= max <= {high}, "
        f"got {value!r}."
    )
  return a, b


def _number(name: str, value: Any, low: float, high: float) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"`aug_config.{name}` must be a number, got {value!r}.")
  if not low <= float(value) <= high:
    raise ValueError(f"`aug_config.{name}` must be in [{low}, {high}], got {value!r}.")
  return float(value)


def _size(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"`aug_config.{name}` must be an int >= 0 (0: the input's size), got {value!r}.")
  return int(value)


def parse_aug_config(aug_config: Any) -> AugParams:
  """Validates an aug_config (ConfigDict, dict or AugParams) into a hashable `AugParams`.

  >>> parse_aug_config(default_aug_config("simclr")).hue
  0.2
  """
  if isinstance(aug_config, AugParams):
    return aug_config
  if hasattr(aug_config, "to_dict"):
    aug_config = aug_config.to_dict()
  if not isinstance(aug_config, Mapping):
    raise TypeError(
        f"`aug_config` must be a ConfigDict or a dict, got {type(aug_config).__name__}."
    )
  allowed = set(REQUIRED_KEYS) | set(OPTIONAL_KEYS)
  unknown = sorted(set(aug_config) - allowed)
  if unknown:
    raise ValueError(f"`aug_config` has unknown keys {unknown}; the keys are {sorted(allowed)}.")
  missing = [k for k in REQUIRED_KEYS if k not in aug_config]
  if missing:
    raise ValueError(f"`aug_config` is missing keys {missing}.")
  c = {**OPTIONAL_KEYS, **dict(aug_config)}
  if not isinstance(c["flip"], (bool, np.bool_)):
    raise TypeError(f"`aug_config.flip` must be a bool, got {c['flip']!r}.")
  return AugParams(
      crop_scale=_range("crop_scale", c["crop_scale"], 0.0, 1.0),
      crop_ratio=_range("crop_ratio", c["crop_ratio"], 0.0, math.inf),
      flip=bool(c["flip"]),
      jitter_prob=_number("jitter_prob", c["jitter_prob"], 0.0, 1.0),
      brightness=_number("brightness", c["brightness"], 0.0, math.inf),
      contrast=_number("contrast", c["contrast"], 0.0, math.inf),
      saturation=_number("saturation", c["saturation"], 0.0, math.inf),
      hue=_number("hue", c["hue"], 0.0, 0.5),
      grayscale_prob=_number("grayscale_prob", c["grayscale_prob"], 0.0, 1.0),
      blur_prob=_number("blur_prob", c["blur_prob"], 0.0, 1.0),
      blur_sigma=_range("blur_sigma", c["blur_sigma"], 0.0, math.inf),
      solarize_prob=_number("solarize_prob", c["solarize_prob"], 0.0, 1.0),
      output_size=_size("output_size", c["output_size"]),
  )


# --------------------------------------------------------------------------------------------------
# Single-image operations (x: (H, W, C) float32).


def _crop_box(u: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
  """The crop box from 2·CROP_ATTEMPTS + 2 uniforms in [0, 1) (see `sample_crop_box`)."""
  u_area, u_ratio = u[:CROP_ATTEMPTS], u[CROP_ATTEMPTS:2 * CROP_ATTEMPTS]
  u_top, u_left = u[2 * CROP_ATTEMPTS], u[2 * CROP_ATTEMPTS + 1]
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio
  w = jnp.sqrt(area * jnp.exp(log_r))
  h = jnp.sqrt(area / jnp.exp(log_r))
  fits = (w <= width) & (h <= height)
  first = jnp.argmax(fits)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fallback_h, fallback_w = width / ratio[0], float(width)
  elif in_ratio > ratio[1]:
    fallback_h, fallback_w = float(height), height * ratio[1]
  else:
    fallback_h, fallback_w = float(height), float(width)
  h = jnp.where(fits[first], h[first], fallback_h)
  w = jnp.where(fits[first], w[first], fallback_w)
  top = jnp.where(fits[first], u_top * (height - h), (height - h) / 2)
  left = jnp.where(fits[first], u_left * (width - w), (width - w) / 2)
  return jnp.stack([top, left, h, w]).astype(jnp.float32)


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
  """A random crop box (top, left, h, w) in pixels, as in Inception / SimCLR's random resized crop.

  Area fraction s ~ U(scale) and aspect ratio r = w / h ~ logU(ratio); of CROP_ATTEMPTS candidates the
  first that fits in the image is used, else the largest central box with r clamped to `ratio`.

  >>> box = sample_crop_box(jax.random.key(0), 8, 8, (0.25, 0.25), (1.0, 1.0))
  >>> [round(float(v), 4) for v in box[2:]]
  [4.0, 4.0]
  """
  scale = _range("crop_scale", scale, 0.0, 1.0)
  ratio = _range("crop_ratio", ratio, 0.0, math.inf)
  return _sample_crop_box(key, int(height), int(width), scale, ratio)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _sample_crop_box(key, height, width, scale, ratio):
  return _crop_box(_uniforms(key, _NUM_CROP), height, width, scale, ratio)


def _interpolation_matrix(start: jax.Array, size: jax.Array, n: int, n_out: int | None = None) -> jax.Array:
  """(n_out, n) bilinear weights (n_out = n by default): row i samples start + (i + ½)·size/n_out − ½,
  clamped to [0, n−1]."""
  n_out = n if n_out is None else n_out
  grid = jnp.arange(n, dtype=jnp.float32)
  rows = jnp.arange(n_out, dtype=jnp.float32)
  centres = jnp.clip(start + (rows + 0.5) * (size / n_out) - 0.5, 0.0, n - 1.0)
  return jnp.maximum(0.0, 1.0 - jnp.abs(centres[:, None] - grid[None, :]))


@functools.partial(jax.jit, static_argnames=("output_size",))
def crop_and_resize(image: jax.Array, box: jax.Array, output_size: int = 0) -> jax.Array:
  """Bilinear resampling of the box (top, left, h, w) of an (H, W, C) image to (H, W, C), or to
  (S, S, C) with `output_size` S > 0.

  Output pixel (i, j) reads the input at y = top + (i + ½)·h/H' − ½, x = left + (j + ½)·w/W' − ½, with
  (H', W') the output size (pixel centres; coordinates outside the image are clamped to the border).
  Written as two small interpolation matrices, out = W_y · image · W_xᵀ (cheap to compile, MXU-friendly
  on TPU).

  >>> x = jnp.arange(16.0).reshape(4, 4, 1)
  >>> crop_and_resize(x, jnp.array([0.0, 0.0, 4.0, 4.0]))[..., 0].tolist() == x[..., 0].tolist()
  True
  >>> crop_and_resize(x, jnp.array([0.0, 0.0, 4.0, 4.0]), output_size=2)[..., 0].tolist()  # 2x2 means
  [[2.5, 4.5], [10.5, 12.5]]
  """
  height, width = image.shape[0], image.shape[1]
  box = jnp.asarray(box, jnp.float32)
  w_y = _interpolation_matrix(box[0], box[2], height, output_size or None)
  w_x = _interpolation_matrix(box[1], box[3], width, output_size or None)
  out = jnp.einsum(
      "iy,yxc,jx->ijc", w_y, image.astype(jnp.float32), w_x, precision=jax.lax.Precision.HIGHEST
  )
  return out.astype(image.dtype)


def _uniforms(key: jax.Array, n: int) -> jax.Array:
  # One threefry call per example for all the randomness of an op: it keeps the compiled program
  # (and its compile time) small.
  return jax.random.uniform(key, (n,), dtype=jnp.float32)


def _between(u: jax.Array, low: float, high: float) -> jax.Array:
  return low + (high - low) * u


def _color_jitter(u: jax.Array, image, brightness, contrast, saturation, hue) -> jax.Array:
  b = _between(u[0], max(0.0, 1.0 - brightness), 1.0 + brightness)
  c = _between(u[1], max(0.0, 1.0 - contrast), 1.0 + contrast)
  s = _between(u[2], max(0.0, 1.0 - saturation), 1.0 + saturation)
  h = _between(u[3], -hue, hue)
  ops = [
      lambda x: jnp.clip(x * b, 0.0, 1.0),
      lambda x: jnp.clip(dm_pix.adjust_contrast(x, c), 0.0, 1.0),
  ]
  if image.shape[-1] == 3:
    ops += [
        lambda x: jnp.clip(dm_pix.adjust_saturation(x, s), 0.0, 1.0),
        lambda x: jnp.clip(dm_pix.adjust_hue(x, h), 0.0, 1.0),
    ]
  order = jnp.argsort(u[4:4 + len(ops)])  # a uniformly random permutation
  for step in range(len(ops)):
    image = jax.lax.switch(order[step], ops, image)
  return image


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def color_jitter(
    key: jax.Array,
    image: jax.Array,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> jax.Array:
  """Brightness, contrast, saturation and hue jitter in a random order, each clipped to [0, 1].

  Strengths as in torchvision's ColorJitter / SimCLR v2 (multiplicative brightness). For a
  one-channel image only brightness and contrast apply.

  >>> x = jnp.full((4, 4, 3), 0.5)
  >>> bool(jnp.allclose(color_jitter(jax.random.key(0), x, 0.0, 0.0, 0.0, 0.0), x))
  True
  """
  return _color_jitter(_uniforms(key, _NUM_JITTER), image, brightness, contrast, saturation, hue)


@jax.jit
def gaussian_blur(image: jax.Array, sigma: jax.Array | float) -> jax.Array:
  """Separable gaussian blur of an (H, W, C) image with reflect padding; kernel ≈ 10% of H, odd, >= 3.

  >>> x = jnp.full((8, 8, 1), 0.25)
  >>> bool(jnp.allclose(gaussian_blur(x, 1.0), x))
  True
  """
  height, width = image.shape[0], image.shape[1]
  radius = max(1, int(0.1 * height) // 2)
  radius = min(radius, height - 1, width - 1)
  if radius < 1:
    return image
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  return dm_pix.gaussian_blur(padded, sigma, 2 * radius + 1, padding="VALID")


@jax.jit
def grayscale(image: jax.Array) -> jax.Array:
  """Rec. 601 luma, kept as C channels (identity for C == 1)."""
  if image.shape[-1] == 1:
    return image
  return dm_pix.rgb_to_grayscale(image, keep_dims=True)


def augment_image(key: jax.Array, image: jax.Array, params: AugParams) -> jax.Array:
  """One augmented view of one (H, W, C) float image in [0, 1] (see the module docstring)."""
  u = _uniforms(key, _NUM_CROP + _NUM_JITTER + 7)
  u_crop, u_jitter = u[:_NUM_CROP], u[_NUM_CROP:_NUM_CROP + _NUM_JITTER]
  u = u[_NUM_CROP + _NUM_JITTER:]
  height, width = image.shape[0], image.shape[1]
  x = image.astype(jnp.float32)
  box = _crop_box(u_crop, height, width, params.crop_scale, params.crop_ratio)
  x = jnp.clip(crop_and_resize(x, box, params.output_size), 0.0, 1.0)
  if params.flip:
    x = jnp.where(u[0] < 0.5, x[:, ::-1, :], x)
  p = params
  colour = x.shape[-1] == 3 and (p.saturation or p.hue)
  if p.jitter_prob > 0 and (p.brightness or p.contrast or colour):
    jittered = _color_jitter(u_jitter, x, p.brightness, p.contrast, p.saturation, p.hue)
    x = jnp.where(u[1] < p.jitter_prob, jittered, x)
  if p.grayscale_prob > 0 and x.shape[-1] == 3:
    x = jnp.where(u[2] < p.grayscale_prob, grayscale(x), x)
  if p.blur_prob > 0:
    sigma = _between(u[3], *p.blur_sigma)
    x = jnp.where(u[4] < p.blur_prob, gaussian_blur(x, sigma), x)
  if p.solarize_prob > 0:
    x = jnp.where(u[5] < p.solarize_prob, dm_pix.solarize(x, 0.5), x)
  return jnp.clip(x, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(2,))
def _augment_examples_f32(keys: jax.Array, images: jax.Array, params: AugParams) -> jax.Array:
  return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, params)


def _augment_examples(keys: jax.Array, images: jax.Array, params: AugParams) -> jax.Array:
  # One compiled program per (config, shape) whatever the input dtype: compute in float32.
  return _augment_examples_f32(keys, images.astype(jnp.float32), params).astype(images.dtype)


def _augment_batch(key: jax.Array, images: jax.Array, params: AugParams) -> jax.Array:
  return _augment_examples(jax.random.split(key, images.shape[0]), images, params)


def _check_images(images: Any) -> jax.Array:
  images = _checks.check_array("images", images, ndim=4)
  if images.shape[-1] not in (1, 3):
    raise ValueError(
        f"`images` must be NHWC with 1 or 3 channels, got shape {images.shape} "
        f"({images.shape[-1]} channels)."
    )
  if images.shape[0] < 1 or images.shape[1] < 2 or images.shape[2] < 2:
    raise ValueError(f"`images` must have B >= 1 and H, W >= 2, got shape {images.shape}.")
  return images


def augment_batch(key: jax.Array, images: jax.Array, aug_config: Any) -> jax.Array:
  """One augmented view of every image: (B, H, W, C) float in [0, 1] -> same shape and dtype.

  Each example gets its own key (`jax.random.split(key, B)`), so examples differ and a fixed key
  gives a fixed result. Jit-able (the config is static); computes in float32.

  >>> x = jnp.full((2, 8, 8, 1), 0.5)
  >>> augment_batch(jax.random.key(0), x, default_aug_config("digits")).shape
  (2, 8, 8, 1)
  """
  images = _check_images(images)
  return _augment_batch(key, images, parse_aug_config(aug_config))


def example_keys(key: jax.Array, num_examples: int, num_views: int | None = None) -> jax.Array:
  """The per-example keys `augment_batch` (num_views None: shape (B,)) and `make_views` ((B,
  num_views): view v of example i uses split(split(key, num_views)[v], B)[i]) draw from `key`, for
  `augment_examples`: the same augmentations computed a slice of examples at a time.

  >>> example_keys(jax.random.key(0), 5, 2).shape
  (5, 2)
  """
  if num_views is None:
    return jax.random.split(key, num_examples)
  return jnp.stack([jax.random.split(k, num_examples) for k in jax.random.split(key, num_views)], axis=1)


def augment_examples(keys: jax.Array, images: jax.Array, aug_config: Any | Sequence[Any]) -> jax.Array:
  """The augmentations of `images` (B, H, W, C) with per-example `keys` (`example_keys`): keys of
  shape (B,) give one view, (B, V) -> (V, B, H, W, C) as `make_views` (one config, or one per view).
  `augment_examples(example_keys(key, B), x, c)` is `augment_batch(key, x, c)`, and any slice of
  examples gives the same slice of the result.

  >>> x = jnp.full((3, 8, 8, 1), 0.5)
  >>> k = example_keys(jax.random.key(0), 3, 2)
  >>> bool(jnp.all(augment_examples(k, x, default_aug_config("digits"))[:, 1:] ==
  ...              augment_examples(k[1:], x[1:], default_aug_config("digits"))))
  True
  """
  images = _check_images(images)
  if keys.ndim == 1:
    return _augment_examples(keys, images, parse_aug_config(aug_config))
  params = _view_params(aug_config, keys.shape[1])
  return jnp.stack([_augment_examples(keys[:, v], images, params[v]) for v in range(keys.shape[1])])


def _view_params(aug_config: Any | Sequence[Any], num_views: int) -> list[AugParams]:
  if isinstance(aug_config, (list, tuple)) and not isinstance(aug_config, AugParams):
    if len(aug_config) != num_views:
      raise ValueError(
          f"`aug_config` must be one config or {num_views} configs (one per view), got "
          f"{len(aug_config)}."
      )
    return [parse_aug_config(c) for c in aug_config]
  return [parse_aug_config(aug_config)] * num_views


def make_views(
    key: jax.Array, images: jax.Array, num_views: int, aug_config: Any | Sequence[Any]
) -> jax.Array:
  """`num_views` independent augmentations of each image: (num_views, B, H, W, C).

  `aug_config` is one config for every view, or a sequence of `num_views` configs (asymmetric views
  as in BYOL, "Bootstrap Your Own Latent", Grill et al., 2020).

  >>> x = jnp.full((3, 8, 8, 1), 0.5)
  >>> make_views(jax.random.key(0), x, 2, default_aug_config("digits")).shape
  (2, 3, 8, 8, 1)
  """
  images = _check_images(images)
  if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
    raise ValueError(f"`num_views` must be a positive integer, got {num_views!r}.")
  params = _view_params(aug_config, num_views)
  keys = jax.random.split(key, num_views)
  return jnp.stack([_augment_batch(keys[v], images, params[v]) for v in range(num_views)])
