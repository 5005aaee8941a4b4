"""Float64 NumPy references of jaxcl/data: bilinear sampling of a crop box at the output's pixel
centres (jaxcl.data.augment.crop_and_resize, jaxcl.data.images.resize_square)."""

from __future__ import annotations

import numpy as np


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
