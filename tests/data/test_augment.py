"""jaxcl.data.augment: on-device augmentations, against independent NumPy references (float64 bilinear
sampling, gaussian blur)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxcl.data import augment
from tests.data.reference import bilinear_reference


def _config(**overrides):
  """Everything off (identity crop, no flip, no colour, no blur) unless overridden."""
  cfg = dict(
      crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, jitter_prob=0.0, brightness=0.0,
      contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0,
      blur_sigma=(0.1, 2.0),
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _images(b, h, w, c, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, h, w, c), dtype=np.float32))


@pytest.mark.parametrize(
    "strength,channels,dtype",
    [("simclr", 3, jnp.float32), ("simclr", 3, jnp.bfloat16), ("digits", 1, jnp.float32)],
)
def test_augment_keeps_shape_range_and_is_deterministic(strength, channels, dtype):
  cfg = augment.default_aug_config(strength)
  x = jnp.repeat(_images(1, 12, 12, channels), 8, axis=0).astype(dtype)  # 8 copies of one image
  y = augment.augment_batch(jax.random.key(0), x, cfg)
  assert y.shape == x.shape and y.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  y32 = np.asarray(y, np.float32)
  # Per-example keys: the 8 copies of one image all come out different.
  assert all(not np.allclose(y32[i], y32[j]) for i in range(8) for j in range(i))
  again = augment.augment_batch(jax.random.key(0), x, cfg)
  np.testing.assert_array_equal(np.asarray(again, np.float32), y32)
  other = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg), np.float32)
  assert not np.allclose(other, y32)
  if channels == 3:
    # Every op is well defined on gray RGB input: the output stays gray (R = G = B).
    gray = np.asarray(augment.augment_batch(jax.random.key(2), x[..., :1].repeat(3, -1), cfg))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(gray[..., 1:], np.repeat(gray[..., :1], 2, -1), atol=tol)


def test_augment_under_jit_and_views():
  digits_cfg = augment.default_aug_config("digits")
  gray = jnp.repeat(_images(1, 12, 12, 1), 8, axis=0)
  eager = augment.augment_batch(jax.random.key(3), gray, digits_cfg)
  jitted = jax.jit(lambda k, im: augment.augment_batch(k, im, digits_cfg))(jax.random.key(3), gray)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  cfg = augment.default_aug_config("simclr")
  x = jnp.repeat(_images(1, 12, 12, 3), 8, axis=0)
  views = augment.make_views(jax.random.key(4), x, 2, cfg)
  assert views.shape == (2, 8, 12, 12, 3)
  assert not np.allclose(views[0], views[1])
  asym = augment.make_views(jax.random.key(4), x, 2, [cfg, _config()])
  np.testing.assert_allclose(asym[1], x, atol=1e-6)  # the second view's config is the identity
  with pytest.raises(ValueError, match="one per view"):
    augment.make_views(jax.random.key(4), x, 3, [cfg, cfg])
  with pytest.raises(ValueError, match="num_views"):
    augment.make_views(jax.random.key(4), x, 0, cfg)


def test_augment_examples_with_per_example_keys_is_augment_batch_and_make_views_a_slice_at_a_time():
  """Per-example keys (`example_keys`) give exactly `augment_batch` / `make_views` of the whole batch,
  and the augmentation of any slice of examples (with its slice of the keys) is that slice of the
  result: gradient caching augments each chunk on its own."""
  cfg = augment.default_aug_config("simclr")
  x = _images(8, 12, 12, 3)
  key = jax.random.key(5)
  one = augment.augment_examples(augment.example_keys(key, 8), x, cfg)
  np.testing.assert_array_equal(one, augment.augment_batch(key, x, cfg))
  keys = augment.example_keys(key, 8, 2)
  views = augment.augment_examples(keys, x, cfg)
  np.testing.assert_array_equal(views, augment.make_views(key, x, 2, cfg))
  np.testing.assert_array_equal(augment.augment_examples(keys[3:6], x[3:6], cfg), views[:, 3:6])
  assert not np.allclose(views[:, 0], views[:, 1])


def test_crop_and_resize_matches_reference():
  x = np.asarray(_images(1, 9, 7, 2)[0])
  boxes = ([0.0, 0.0, 9.0, 7.0], [1.3, 0.7, 4.2, 5.1], [4.0, 2.5, 3.0, 3.0], [0.2, 3.1, 8.5, 2.0])
  for box in boxes:
    got = augment.crop_and_resize(jnp.asarray(x), jnp.asarray(box, jnp.float32))
    np.testing.assert_allclose(got, bilinear_reference(x, box), atol=2e-5)


def test_crop_and_resize_to_another_size_matches_reference():
  """`output_size` S samples the box at the S x S output's pixel centres (multi-crop's small views)."""
  x = np.asarray(_images(2, 9, 7, 2)[0])
  for box, size in (([0.0, 0.0, 9.0, 7.0], 4), ([1.3, 0.7, 4.2, 5.1], 3), ([0.2, 3.1, 8.5, 2.0], 11)):
    got = augment.crop_and_resize(jnp.asarray(x), jnp.asarray(box, jnp.float32), output_size=size)
    np.testing.assert_allclose(got, bilinear_reference(x, box, (size, size)), atol=2e-5)


def test_small_views_of_a_multi_crop():
  cfg = {**augment.default_aug_config("digits").to_dict(), "output_size": 5}
  x = _images(3, 8, 8, 1)
  views = augment.augment_examples(augment.example_keys(jax.random.key(0), 3, 4), x, cfg)
  assert views.shape == (4, 3, 5, 5, 1)
  assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
  with pytest.raises(ValueError, match="`aug_config.output_size` must be an int >= 0"):
    augment.augment_examples(augment.example_keys(jax.random.key(0), 3, 2), x, {**cfg, "output_size": -1})


def test_crop_boxes_respect_scale_and_ratio():
  keys = jax.random.split(jax.random.key(0), 512)
  sample = lambda k: augment.sample_crop_box(k, 16, 24, (0.2, 0.6), (0.5, 2.0))  # noqa: E731
  boxes = np.asarray(jax.vmap(sample)(keys))
  top, left, h, w = boxes.T
  area = h * w / (16 * 24)
  assert np.all(area >= 0.2 - 1e-5) and np.all(area <= 0.6 + 1e-5)
  assert np.all(w / h >= 0.5 - 1e-5) and np.all(w / h <= 2.0 + 1e-5)
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 16 + 1e-4) and np.all(left + w <= 24 + 1e-4)
  assert area.std() > 0.05 and top.std() > 0.5  # varied sizes and positions
  # An impossible aspect (every candidate too wide) falls back to the central box of clamped aspect.
  fallback = np.asarray(augment.sample_crop_box(jax.random.key(1), 8, 8, (1.0, 1.0), (3.0, 4.0)))
  np.testing.assert_allclose(fallback, [(8 - 8 / 3) / 2, 0.0, 8 / 3, 8.0], atol=1e-5)


def test_random_resized_crop_zooms_into_a_ramp():
  ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 16)[None, :, None], (16, 16, 1))
  x = jnp.broadcast_to(ramp, (8, 16, 16, 1))
  y = np.asarray(augment.augment_batch(jax.random.key(2), x, _config(crop_scale=(0.25, 0.25))))
  step = 1.0 / 15
  # A quarter of the area at aspect 1 is an 8x8 box: resampled to 16x16, the ramp's slope halves.
  np.testing.assert_allclose(np.diff(y[:, :, 1:-1, 0], axis=2), step / 2, atol=1e-5)
  starts = y[:, 0, 1, 0]
  assert np.all(y[..., 0].max(axis=(1, 2)) - y[..., 0].min(axis=(1, 2)) < 0.56)  # half the range
  assert starts.std() > 0.02  # the crop position varies across examples
  np.testing.assert_allclose(augment.augment_batch(jax.random.key(2), x, _config()), x, atol=1e-6)


def test_flip_and_channels():
  x = _images(16, 6, 6, 1, seed=5)
  y = np.asarray(augment.augment_batch(jax.random.key(0), x, _config(flip=True)))
  same = [np.allclose(y[i], x[i], atol=1e-6) for i in range(16)]
  mirrored = [np.allclose(y[i], x[i, :, ::-1], atol=1e-6) for i in range(16)]
  assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
  # The colour-only ops are skipped (the identity) on one-channel images.
  colour = _config(jitter_prob=1.0, saturation=0.9, hue=0.4, grayscale_prob=1.0)
  gray = x[:4]
  out = augment.augment_batch(jax.random.key(0), gray, colour)
  np.testing.assert_allclose(out, gray, atol=1e-6)
  # Saturation and hue leave a gray RGB image unchanged.
  gray_rgb = jnp.repeat(gray[0], 3, axis=-1)
  jittered = augment.color_jitter(jax.random.key(1), gray_rgb, 0.0, 0.0, 0.9, 0.4)
  np.testing.assert_allclose(jittered, gray_rgb, atol=1e-5)
  # Grayscale of a colour image: Rec. 601 luma in every channel.
  rgb = _images(2, 6, 6, 3, seed=6)
  g = np.asarray(augment.grayscale(rgb[0]))
  want = np.asarray(rgb[0], np.float64) @ np.array([0.2989, 0.5870, 0.1140])
  for c in range(3):
    np.testing.assert_allclose(g[..., c], want, atol=1e-6)
  np.testing.assert_array_equal(augment.grayscale(gray[0]), gray[0])


def test_brightness_is_a_bounded_factor():
  x = 0.2 + 0.5 * _images(8, 6, 6, 1)  # in [0.2, 0.7]: x * (1 ± 0.4) stays inside [0, 1]
  cfg = _config(jitter_prob=1.0, brightness=0.4)
  y = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg))
  factor = y / np.asarray(x)
  per_example = factor.reshape(8, -1)
  np.testing.assert_allclose(per_example, np.broadcast_to(per_example[:, :1], (8, 36)), rtol=1e-5)
  assert np.all(per_example >= 0.6 - 1e-6) and np.all(per_example <= 1.4 + 1e-6)
  assert per_example[:, 0].std() > 0.05


def _blur_reference(image, sigma):
  image = np.asarray(image, np.float64)
  radius = max(1, int(0.1 * image.shape[0]) // 2)
  t = np.arange(-radius, radius + 1)
  k = np.exp(-t**2 / (2 * sigma**2))
  k /= k.sum()
  p = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  rows = sum(k[a] * p[a:a + h, :, :] for a in range(len(k)))
  return sum(k[a] * rows[:, a:a + w, :] for a in range(len(k)))


def test_gaussian_blur_matches_reference():
  for size, sigma in ((8, 0.7), (40, 1.5)):
    x = _images(1, size, size, 3, seed=size)[0]
    want = _blur_reference(x, sigma)
    np.testing.assert_allclose(augment.gaussian_blur(x, sigma), want, atol=1e-5)


def test_bad_aug_inputs():
  cfg = augment.default_aug_config("simclr")
  x = _images(2, 8, 8, 3)
  with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
    augment.augment_batch(jax.random.key(0), x, {**cfg.to_dict(), "colour": 1.0})
  with pytest.raises(ValueError, match="missing keys \\['hue'\\]"):
    no_hue = {k: v for k, v in cfg.to_dict().items() if k != "hue"}
    augment.augment_batch(jax.random.key(0), x, no_hue)
  with pytest.raises(ValueError, match="crop_scale"):
    augment.augment_batch(jax.random.key(0), x, _config(crop_scale=(0.5, 0.2)))
  with pytest.raises(ValueError, match="jitter_prob"):
    augment.augment_batch(jax.random.key(0), x, _config(jitter_prob=1.5))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    augment.augment_batch(jax.random.key(0), _images(2, 8, 8, 2), cfg)
  with pytest.raises(ValueError, match="rank 4"):
    augment.augment_batch(jax.random.key(0), x[0], cfg)
  with pytest.raises(ValueError, match="strength"):
    augment.default_aug_config("strong")
