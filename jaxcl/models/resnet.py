"""ResNet encoders (basic and bottleneck blocks) returning globally pooled features or the last feature map.

"Deep Residual Learning for Image Recognition" (He et al., 2016), with the stride of a bottleneck block
on its 3x3 convolution ("v1.5", as in torchvision and the Flax ImageNet example) and, for small images,
the CIFAR stem of SimCLR ("A Simple Framework for Contrastive Learning of Visual Representations",
Chen et al., 2020): a 3x3 stride-1 convolution and no max-pool.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.models import _layers

BLOCKS = ("basic", "bottleneck")
_EXPANSION = {"basic": 1, "bottleneck": 4}
# He (fan-out) initialisation of convolutions, as in torchvision.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (k - 1) // 2
  return ((p, p), (p, p))


class _Block(nn.Module):
  """One residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 ×4)."""

  features: int
  strides: int
  block: str
  norm: str
  train: bool
  zero_init_residual: bool
  groups: int
  bn_momentum: float
  dtype: Any
  param_dtype: Any

  def _conv(self, features, k, strides, name):
    return nn.Conv(
        features, (k, k), (strides, strides), padding=_pad(k), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_CONV_INIT, name=name,
    )

  def _norm(self, channels, name, zero=False):
    return _layers.make_norm(
        self.norm, channels, train=self.train, name=name, dtype=self.dtype,
        param_dtype=self.param_dtype, momentum=self.bn_momentum, groups=self.groups,
        zero_scale=zero and self.zero_init_residual,
    )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f, s = self.features, self.strides
    if self.block == "basic":
      y = nn.relu(self._norm(f, "norm1")(self._conv(f, 3, s, "conv1")(x)))
      y = self._norm(f, "norm2", zero=True)(self._conv(f, 3, 1, "conv2")(y))
    else:
      y = nn.relu(self._norm(f, "norm1")(self._conv(f, 1, 1, "conv1")(x)))
      y = nn.relu(self._norm(f, "norm2")(self._conv(f, 3, s, "conv2")(y)))
      y = self._norm(4 * f, "norm3", zero=True)(self._conv(4 * f, 1, 1, "conv3")(y))
    residual = x
    if residual.shape != y.shape:
      residual = self._norm(y.shape[-1], "proj_norm")(self._conv(y.shape[-1], 1, s, "proj_conv")(x))
    return nn.relu(residual + y)


class ResNet(nn.Module):
  r"""ResNet trunk: stem → stages of residual blocks → global average pool → (B, F) features.

  "Deep Residual Learning for Image Recognition" (He et al., 2016). Stage i has `stage_sizes[i]` blocks
  of width `width · 2^i` (×4 output channels for bottleneck blocks); the first block of every stage but
  the first downsamples by 2. F = width · 2^(len(stage_sizes) − 1) · expansion (512 for ResNet-18,
  2048 for ResNet-50). No classification head.

  Stems: `small_image=True` is the SimCLR CIFAR stem (3x3 conv, stride 1, no max-pool); otherwise the
  ImageNet stem (7x7 conv stride 2, 3x3 max-pool stride 2).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
    block: "basic" or "bottleneck".
    width: channels of the stem and of the first stage.
    small_image: CIFAR stem (True) or ImageNet stem (False).
    norm: "batch" (running statistics in the "batch_stats" collection), "group" or "layer".
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are `param_dtype` (float32).
    zero_init_residual: γ = 0 for the last norm of every residual branch (Goyal et al., 2017).
    groups: GroupNorm groups (gcd with the channel count is used).
    bn_momentum: running-average momentum of BatchNorm (new = m·old + (1 − m)·batch).
    remat: recompute each residual block's activations in the backward pass (`jax.checkpoint`), as
      `ViT.remat` (running statistics update as without it).

  `__call__(x, train)`: x is a (B, H, W, C) float image batch (NHWC). With norm="batch", call
  `apply(..., train=True, mutable=["batch_stats"])` to train; eval mode uses the running statistics.

  `feature_map(x, train)`: the last stage's output before the pool, (B, H', W', F) with H' = H / s
  (s = 2^(len(stage_sizes) − 1), ×4 more with the ImageNet stem), for the dense objectives of
  `jaxcl.losses.spatial`. Call it with `apply(variables, x, method="feature_map")`: the same parameters
  (and running statistics) as `__call__`, whose output is exactly `mean(feature_map(x), axis=(1, 2))`.

  >>> import jax, jax.numpy as jnp
  >>> model = ResNet(stage_sizes=(1,), width=4)
  >>> x = jnp.ones((2, 8, 8, 3))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> model.apply(variables, x, train=False).shape
  (2, 4)
  >>> model.apply(variables, x, train=False, method="feature_map").shape
  (2, 8, 8, 4)
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  small_image: bool = True
  norm: str = "batch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  zero_init_residual: bool = True
  groups: int = 32
  bn_momentum: float = 0.9
  remat: bool = False

  @property
  def output_dim(self) -> int:
    """F, the size of the pooled features."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * _EXPANSION[self.block]

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, F) globally average-pooled features of the (B, H, W, C) images `x`."""
    # Global average pool (jnp.mean accumulates low-precision inputs in float32).
    return jnp.mean(self.feature_map(x, train), axis=(1, 2)).astype(self.dtype)

  @nn.compact
  def feature_map(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(B, H', W', F) output of the last stage, before the pool, of the (B, H, W, C) images `x`."""
    _checks.check_choice("block", self.block, BLOCKS)
    _checks.check_choice("norm", self.norm, _layers.NORMS)
    if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
      raise ValueError(
          f"`stage_sizes` must be a non-empty sequence of positive ints, got {self.stage_sizes}."
      )
    x = _layers.check_images("x", x)
    norm = functools.partial(
        _layers.make_norm, self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
        momentum=self.bn_momentum, groups=self.groups,
    )
    k, s = (3, 1) if self.small_image else (7, 2)
    x = nn.Conv(
        self.width, (k, k), (s, s), padding=_pad(k), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_CONV_INIT, name="stem_conv",
    )(x)
    x = nn.relu(norm(self.width, name="stem_norm")(x))
    if not self.small_image:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block = _layers.block_class(_Block, self.remat)
    for i, n in enumerate(self.stage_sizes):
      for j in range(int(n)):
        x = block(
            features=self.width * 2 ** i, strides=2 if (i > 0 and j == 0) else 1, block=self.block,
            norm=self.norm, train=train, zero_init_residual=self.zero_init_residual,
            groups=self.groups, bn_momentum=self.bn_momentum, dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"stage{i + 1}_block{j + 1}",
        )(x)
    return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet18.__doc__ = """ResNet-18 trunk (basic blocks, 2-2-2-2): 512-d features, 11.2M parameters."""
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet34.__doc__ = """ResNet-34 trunk (basic blocks, 3-4-6-3): 512-d features."""
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet50.__doc__ = """ResNet-50 trunk (bottleneck blocks, 3-4-6-3): 2048-d features, 23.5M parameters."""
