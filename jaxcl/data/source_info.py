"""The data contract every source keeps: `SourceInfo` (what a split tells the rest of jaxcl) and how a
data config is read (`config_value`, `config_image_size`).

A source backend (`jaxcl.data.tfds_source`, `jaxcl.data.folder_source`) returns `(source, SourceInfo)`;
`jaxcl.data.sources.build_source` picks the backend from `data_config.name`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Label → text for data without templates of its own: captions made from class labels (image–text
# training on a labelled folder or tfds dataset) and zero-shot prompts (CLIP's prompt style).
GENERIC_CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What a data source tells the rest of jaxcl about one split (`build_source`, `abstract_info`)."""

  num_examples: int
  image_shape: tuple[int, ...]  # (H, W, C) of every example's image; () for text-only data (no image)
  num_classes: int  # 0: no labels
  class_names: tuple[str, ...]  # one per class
  has_captions: bool  # every example carries a "caption"
  captions_from_labels: bool  # those captions are `caption_templates` filled with the class name
  caption_templates: tuple[str, ...]  # label → text ("a photo of a {}."): made captions, zero-shot prompts
  num_ids: int  # the stable example ids (`index`) lie in [0, num_ids)
  from_data: bool = True  # False: planned from the config alone (`abstract_info`), no data behind it


def config_value(config: Any, key: str, default: Any = None) -> Any:
  """config[key] for a ConfigDict, dict or attribute object; `default` when absent or None.

  >>> config_value({"image_size": None}, "image_size", 0), config_value({}, "folder", "")
  (0, '')
  """
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def config_image_size(config: Any) -> int:
  """`data_config.image_size` (0 when absent): an integer >= 0, else a ValueError naming the key."""
  size = config_value(config, "image_size", 0)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
    raise ValueError(f"`data_config.image_size` must be an integer >= 0, got {size!r}.")
  return int(size)
