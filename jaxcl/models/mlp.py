"""A small MLP encoder for flat or tiny inputs (tests, toy data, the bundled digits)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.models import _layers


class MLP(nn.Module):
  r"""MLP encoder: flatten → (Dense → norm → ReLU) per hidden size → optional Dense(out_dim).

      h_0 = flatten(x),   h_l = ReLU(norm(W_l h_{l−1} + b_l)),   y = W_out h_L (+ b)  if out_dim

  A baseline encoder: the "multilayer perceptron" of every representation-learning paper; the input
  (B, ...) is flattened to (B, prod(...)).

  Attributes:
    hidden_dims: hidden sizes. out_dim: size of a final linear layer (None: output h_L).
    norm: "layer", "batch" (running statistics in "batch_stats") or "none".
    dtype: compute dtype; parameters are `param_dtype` (float32).

  >>> import jax, jax.numpy as jnp
  >>> model = MLP(hidden_dims=(16,), out_dim=4)
  >>> x = jnp.ones((2, 8, 8, 1))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> model.apply(variables, x, train=False).shape
  (2, 4)
  """

  hidden_dims: Sequence[int] = (256, 256)
  out_dim: int | None = None
  norm: str = "layer"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def output_dim(self) -> int:
    return self.out_dim if self.out_dim is not None else tuple(self.hidden_dims)[-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _checks.check_choice("norm", self.norm, ("layer", "batch", "none"))
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`x` must be a floating-point batch (B, ...) of rank >= 2, got shape {x.shape} "
                       f"and dtype {x.dtype}.")
    x = jnp.reshape(x, (x.shape[0], -1))
    for i, h in enumerate(self.hidden_dims):
      x = nn.Dense(int(h), dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense{i}")(x)
      if self.norm != "none":
        x = _layers.make_norm(
            self.norm, int(h), train=train, name=f"norm{i}", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
      x = nn.relu(x)
    if self.out_dim is not None:
      x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(x)
    return x
