"""Symmetric image–text losses: CLIP (softmax) and SigLIP (sigmoid)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
@_common.shardable("image", "text")
def clip(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
  r"""CLIP: symmetric cross-entropy over the image–text similarity matrix.

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021).
  With S = logit_scale · image @ textᵀ (logit_scale is the multiplier, initialised to 1/0.07 in CLIP):

      loss = ½ mean_i [ −S_ii + log Σ_j exp S_ij ] + ½ mean_j [ −S_jj + log Σ_i exp S_ij ]

  Both directions come from one pass over S (row and column log-sum-exp together).

  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(4)
  >>> round(float(clip(x, x, logit_scale=1.0)), 4)  # log(e + 3) - 1
  0.7437
  """
  del mesh  # handled by @shardable
  i, t = _common.pair("image", image, "text", text, normalize=normalize)
  scale = _common.logit_scale(logit_scale)
  lse = ops.logsumexp(i, t, scale=scale, rows=True, cols=True, impl=impl, axis_name=axis_name)
  positive = scale * _common.rowwise_dot(i, t)
  return 0.5 * _common.batch_mean(lse.rows + lse.cols - 2.0 * positive, axis_name)


@_common.keyword_only
@_common.shardable("image", "text")
def siglip(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array,
    logit_bias: float | jax.Array,
    normalize: bool = True,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
  r"""SigLIP: independent binary classification of every image–text pair.

  "Sigmoid Loss for Language Image Pre-Training" (Zhai et al., 2023). With z_ij = +1 on the diagonal and
  −1 elsewhere, t = logit_scale (SigLIP initialises t = 10, b = −10):

      loss = mean_i Σ_j −log σ( z_ij (t <x_i, y_j> + b) )

  Sharded, each device holds a chunk of images and the text chunks pass by (SigLIP §3.3).
  `impl="allgather" | "ring"` with `axis_name` / `mesh`: the batch split over devices ("Sharded batches" in
  `jaxcl.losses`).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)
  >>> round(float(siglip(x, x, logit_scale=1.0, logit_bias=0.0)), 4)  # softplus(-1) + softplus(0)
  1.0064
  """
  del mesh  # handled by @shardable
  i, t = _common.pair("image", image, "text", text, normalize=normalize)
  scale = _common.logit_scale(logit_scale)
  bias = _common.logit_bias(logit_bias)
  return _common.batch_mean(
      ops.sigmoid_sum(i, t, scale=scale, bias=bias, impl=impl, axis_name=axis_name), axis_name
  )
