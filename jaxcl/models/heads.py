"""Projection and prediction MLP heads put on top of an encoder's pooled features, and GRAM's matching head
on (anchor, data) embedding pairs."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import losses
from jaxcl.models import _layers

HEAD_NORMS = ("batch", "layer", "group", "none")


def _dims(name: str, dims: int | Sequence[int]) -> tuple[int, ...]:
  dims = (dims,) if isinstance(dims, int) else tuple(dims)
  if any(int(d) < 1 for d in dims):
    raise ValueError(f"`{name}` must be positive sizes, got {dims}.")
  return tuple(int(d) for d in dims)


def _mlp(x, train, *, hidden, out_dim, norm, output_norm, bn_momentum, dtype, param_dtype):
  """Dense(h) → [norm] → ReLU for every h in hidden, then Dense(out) → [norm without affine if asked].

  Called inside a compact `__call__`: the layers become children of the calling module.
  """
  _checks.check_choice("norm", norm, HEAD_NORMS)
  x = _checks.check_array("x", x, ndim=2)
  use_norm = norm != "none"

  def norm_layer(channels, name, affine=True):
    return _layers.make_norm(
        norm, channels, train=train, name=name, dtype=dtype, param_dtype=param_dtype,
        momentum=bn_momentum, affine=affine,
    )

  for i, h in enumerate(hidden):
    x = nn.Dense(h, use_bias=not use_norm, dtype=dtype, param_dtype=param_dtype, name=f"dense{i}")(x)
    if use_norm:
      x = norm_layer(h, f"{norm[0]}n{i}")(x)
    x = nn.relu(x)
  out_norm = output_norm and use_norm
  x = nn.Dense(
      out_dim, use_bias=not out_norm, dtype=dtype, param_dtype=param_dtype, name=f"dense{len(hidden)}"
  )(x)
  if out_norm:
    x = norm_layer(out_dim, f"{norm[0]}n{len(hidden)}", affine=False)(x)
  return x


class ProjectionHead(nn.Module):
  r"""SimCLR projection MLP g(h): (Dense → BN → ReLU) per hidden size, then Dense(out_dim).

  "A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., 2020); the
  BatchNorm variant is SimCLR v2 / BYOL / MoCo v3 ("Big Self-Supervised Models are Strong
  Semi-Supervised Learners", Chen et al., 2020):

      z = W_L · ReLU(BN(W_{L−1} · … ReLU(BN(W_1 h))))

  Dense layers followed by a norm have no bias (the norm's shift replaces it). With norm="none" it is
  the SimCLR v1 head Dense → ReLU → Dense (with biases); "layer" / "group" swap BatchNorm for a
  per-example norm (batch-size independent). `output_norm=True` adds a norm without affine parameters
  on the output (SimSiam's projector). BatchNorm layers are named bn0, bn1, … (ln…, gn… otherwise).

  Attributes:
    hidden_dims: hidden sizes, e.g. (2048,) or (2048, 2048); an int is one hidden layer.
    out_dim: output size. norm: "batch", "layer", "group" or "none".
    dtype: compute dtype (parameters float32).

  >>> import jax, jax.numpy as jnp
  >>> head = ProjectionHead(hidden_dims=(16,), out_dim=4)
  >>> h = jnp.ones((3, 8))
  >>> variables = head.init(jax.random.key(0), h, train=False)
  >>> head.apply(variables, h, train=False).shape
  (3, 4)
  """

  hidden_dims: int | Sequence[int]
  out_dim: int
  norm: str = "batch"
  output_norm: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return _mlp(
        x, train, hidden=_dims("hidden_dims", self.hidden_dims), out_dim=_dims("out_dim", self.out_dim)[0],
        norm=self.norm, output_norm=self.output_norm, bn_momentum=self.bn_momentum, dtype=self.dtype,
        param_dtype=self.param_dtype,
    )


class PredictionHead(nn.Module):
  r"""BYOL / SimSiam predictor q(z): Dense(hidden_dim) → BN → ReLU → Dense(out_dim).

  "Bootstrap Your Own Latent" (Grill et al., 2020): hidden 4096, out 256; "Exploring Simple Siamese
  Representation Learning" (Chen & He, 2021): a bottleneck, hidden 512, out 2048.

      p = W_2 · ReLU(BN(W_1 z))

  >>> import jax, jax.numpy as jnp
  >>> head = PredictionHead(hidden_dim=16, out_dim=8)
  >>> z = jnp.ones((3, 8))
  >>> variables = head.init(jax.random.key(0), z, train=False)
  >>> head.apply(variables, z, train=False).shape
  (3, 8)
  """

  hidden_dim: int
  out_dim: int
  norm: str = "batch"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return _mlp(
        x, train, hidden=_dims("hidden_dim", self.hidden_dim), out_dim=_dims("out_dim", self.out_dim)[0],
        norm=self.norm, output_norm=False, bn_momentum=self.bn_momentum, dtype=self.dtype,
        param_dtype=self.param_dtype,
    )


class MatchHead(nn.Module):
  r"""GRAM's data–anchor matching head: 2 logits (no match, match) for each (anchor, data) embedding pair.

  "Gramian Multimodal Representation Learning and Alignment" (Cicchetti et al., ICLR 2025). With a and d
  the L2-normalised anchor (text) and data (image) embeddings of a pair:

      x = [a; d; a ⊙ d]                                            (3E,)
      logits = W₂ · LayerNorm(GELU(W₁ x + b₁)) + b₂                 (2,): [no match, match]

  The authors' head (github.com/ispamm/GRAM, `model/general_module.py`, `Match_head`: Linear → GELU →
  LayerNorm(eps 1e-12) → Linear(2)) reads the [CLS] token of a BERT that cross-attends from the caption's
  tokens to the data's tokens (`model/gram.py`, `forward_ret`); here it reads the fused pooled
  embeddings instead (no token-level cross-attention: a few Dense layers, not a second transformer).

  Attributes:
    hidden: the hidden size of W₁. dtype: compute dtype (parameters float32).

  >>> import jax, jax.numpy as jnp
  >>> head = MatchHead(hidden=8)
  >>> a, d = jnp.ones((3, 4)), jnp.ones((3, 4))
  >>> head.apply(head.init(jax.random.key(0), a, d), a, d).shape
  (3, 2)
  """

  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, anchor: jax.Array, data: jax.Array) -> jax.Array:
    anchor = _checks.check_array("anchor", anchor, ndim=2)
    data = _checks.check_array("data", data, ndim=2)
    _checks.check_same_shape("anchor", anchor, "data", data)
    a, d = (losses.l2_normalize(x.astype(jnp.float32)) for x in (anchor, data))
    x = jnp.concatenate([a, d, a * d], axis=-1)
    h = nn.Dense(_dims("hidden", self.hidden)[0], dtype=self.dtype, param_dtype=self.param_dtype, name="dense0")(x)
    h = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(
        nn.gelu(h, approximate=False))
    return nn.Dense(2, dtype=self.dtype, param_dtype=self.param_dtype, name="dense1")(h).astype(jnp.float32)
