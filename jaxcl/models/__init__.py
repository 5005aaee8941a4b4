"""Flax encoders: ResNet, ViT, text transformer, MLP, projection/prediction heads, dual encoder, MiniLM.

Every model is a Flax Linen module with pure `init`/`apply` (parameters are plain pytrees), a
configurable compute `dtype` (float32 parameters), and `__call__(x, train)` returning pooled features
(B, F); `ResNet` and `ViT` also return their last (B, H', W', F) feature map with
`apply(variables, x, method="feature_map")`, the same parameters as `__call__`. BatchNorm models keep
running statistics in the "batch_stats" collection.
"""

from __future__ import annotations

from jaxcl import _extras

_extras.require_train_extra("jaxcl.models")  # before the imports below, which need it

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from jaxcl.models.dual import CLIP_LOGIT_SCALE_INIT
from jaxcl.models.dual import DualEncoder
from jaxcl.models.dual import SIGLIP_LOGIT_BIAS_INIT
from jaxcl.models.dual import SIGLIP_LOGIT_SCALE_INIT
from jaxcl.models.heads import MatchHead
from jaxcl.models.heads import PredictionHead
from jaxcl.models.heads import ProjectionHead
from jaxcl.models.minilm import BertEncoder
from jaxcl.models.minilm import load_minilm
from jaxcl.models.mlp import MLP
from jaxcl.models.resnet import ResNet
from jaxcl.models.resnet import ResNet18
from jaxcl.models.resnet import ResNet34
from jaxcl.models.resnet import ResNet50
from jaxcl.models.sparse_autoencoder import SparseAutoencoder
from jaxcl.models.temperature import AMCLTemperature
from jaxcl.models.temperature import amcl_pair_temperatures
from jaxcl.models.text import SimpleTokenizer
from jaxcl.models.text import TextTransformer
from jaxcl.models.vit import ViT
from jaxcl.models.vit import ViT_B
from jaxcl.models.vit import ViT_S
from jaxcl.models.vit import ViT_Ti

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "vit_ti": ViT_Ti,
    "vit_s": ViT_S,
    "vit_b": ViT_B,
    "text_transformer": TextTransformer,
    "mlp": MLP,
}


def model_names() -> tuple[str, ...]:
  """Names accepted by `build_model`."""
  return tuple(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """An encoder by name, with its attributes overridden by `kwargs`.

  Names: "resnet18", "resnet34", "resnet50" (`ResNet`), "vit_ti", "vit_s", "vit_b" (`ViT`, patch 16
  unless `patch_size=` is given), "text_transformer" (`TextTransformer`, needs vocab_size, width, depth,
  heads, max_len), "mlp" (`MLP`). Case, "-" and "_" are ignored ("ViT-B" is "vit_b").

  >>> model = build_model("resnet18", width=4)
  >>> type(model).__name__, model.stage_sizes, model.width
  ('ResNet', (2, 2, 2, 2), 4)
  """
  if not isinstance(name, str):
    raise TypeError(f"`name` must be a string, one of {model_names()}, got {name!r}.")
  canonical = {k.replace("_", ""): k for k in _REGISTRY}
  key = canonical.get(name.strip().lower().replace("-", "").replace("_", ""))
  if key is None:
    raise ValueError(f"`name` must be one of {model_names()}, got {name!r}.")
  factory = _REGISTRY[key]
  cls = getattr(factory, "func", factory)
  fields = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise TypeError(
        f"build_model({name!r}) got unknown argument(s) {unknown}; `{cls.__name__}` accepts {fields}."
    )
  return factory(**kwargs)


__all__ = [
    "AMCLTemperature",
    "BertEncoder",
    "CLIP_LOGIT_SCALE_INIT",
    "DualEncoder",
    "MLP",
    "MatchHead",
    "PredictionHead",
    "ProjectionHead",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "SimpleTokenizer",
    "SparseAutoencoder",
    "TextTransformer",
    "ViT",
    "ViT_B",
    "ViT_S",
    "ViT_Ti",
    "amcl_pair_temperatures",
    "build_model",
    "load_minilm",
    "model_names",
]
