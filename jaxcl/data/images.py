"""Pixels on the host (NumPy / Pillow): conversion to float32 in [0, 1], decoding encoded bytes and
Pillow images, and resizing to a square.

Resizing (`resize_square`, a data config's image_size > 0) scales the shorter side to the size
(bilinear, antialiased, Pillow) and takes the central square.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# Pillow modes read as one channel; the 16/32-bit ones are scaled by 1 / 65535.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_float01(image: Any, *, what: str = "image") -> np.ndarray:
  """An (H, W, C) image as float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool, or float (clipped).

  >>> to_float01(np.array([[[0], [255]]], np.uint8))[..., 0].tolist()
  [[0.0, 1.0]]
  """
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise ValueError(f"{what} must have shape (H, W, C) or (H, W), got shape {a.shape}.")
  if a.dtype == np.uint8:
    return a.astype(np.float32) / np.float32(255.0)
  if a.dtype == np.uint16:
    return a.astype(np.float32) / np.float32(65535.0)
  if a.dtype == np.bool_:
    return a.astype(np.float32)
  if np.issubdtype(a.dtype, np.floating):
    return np.clip(a.astype(np.float32), 0.0, 1.0)
  raise TypeError(f"{what} must be uint8, uint16, bool or float, got dtype {a.dtype}.")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Scales the shorter side of a float (H, W, C) image to `size` and keeps the central square.

  Bilinear with Pillow's antialiasing when shrinking; channels are resized one by one in float ("F")
  mode, so there is no 8-bit rounding. `size == 0` returns the image unchanged.

  >>> resize_square(np.ones((8, 6, 1), np.float32), 4).shape
  (4, 4, 1)
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if size == 0 or image.shape[:2] == (size, size):
    return image
  h, w = image.shape[:2]
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  box = (left, top, left + size, top + size)
  channels = []
  for c in range(image.shape[2]):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    plane = plane.resize((new_w, new_h), Image.Resampling.BILINEAR).crop(box)
    channels.append(np.asarray(plane, np.float32))
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def decode_bytes(data: bytes, channels: int | None, what: str) -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, … anything Pillow opens) as a float (H, W, channels) image
  (`pil_to_float`); `channels` None: 1 for a grayscale image, else 3. `what` names the image in errors."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with Image.open(io.BytesIO(data)) as im:
      return pil_to_float(im, channels or (1 if im.mode in GRAY_MODES else 3))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{what}: cannot decode the encoded image bytes ({e}).") from e


def pil_to_float(im: Any, channels: int) -> np.ndarray:
  """A Pillow image as float32 (H, W, channels) in [0, 1]: 8-bit modes / 255, 16/32-bit gray / 65535
  (`HIGH_BIT_MODES`, clipped); channels 1 is grayscale (Pillow's "L"), 3 is RGB (alpha dropped)."""
  if channels == 1:
    if im.mode in HIGH_BIT_MODES:
      return np.clip(np.asarray(im, np.float32) / np.float32(65535.0), 0.0, 1.0)[..., None]
    return np.asarray(im.convert("L"), np.float32)[..., None] / np.float32(255.0)
  if im.mode in HIGH_BIT_MODES:
    gray = np.clip(np.asarray(im, np.float32) / np.float32(65535.0), 0.0, 1.0)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"), np.float32) / np.float32(255.0)
