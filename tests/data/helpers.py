"""Shared helpers of the data tests: the digits config, small images (PNG files and bytes), folder
configs, and the float64 bilinear-sampling reference."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from jaxcl.data import sources


def digits_config(data_dir, **overrides):
  cfg = sources.default_data_config("digits")
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


def pattern(i, h, w, c):
  rng = np.random.default_rng(100 + i)
  return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buf, format="PNG")
  return buf.getvalue()


def save_image(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def folder_config(folder, **overrides):
  cfg = sources.default_data_config("folder")
  cfg.folder = str(folder)
  cfg.update(overrides)
  return cfg


def bilinear_reference(image, box, out_shape=None):
  """float64 NumPy: sample the box (top, left, h, w) at the output's pixel centres, clamped."""
  image = np.asarray(image, np.float64)
  hh, ww = image.shape[:2]
  oh, ow = out_shape or (hh, ww)
  top, left, h, w = (float(v) for v in box)
  out = np.zeros((oh, ow, image.shape[2]))
  for i in range(oh):
    for j in range(ow):
      y = min(max(top + (i + 0.5) * h / oh - 0.5, 0.0), hh - 1.0)
      x = min(max(left + (j + 0.5) * w / ow - 0.5, 0.0), ww - 1.0)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, hh - 1), min(x0 + 1, ww - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * (1 - fx) * image[y0, x0] + (1 - fy) * fx * image[y0, x1]
                   + fy * (1 - fx) * image[y1, x0] + fy * fx * image[y1, x1])
  return out
