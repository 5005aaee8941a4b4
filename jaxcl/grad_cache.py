"""Gradient caching: the gradient of a contrastive loss over a whole batch, the encoders run chunk by chunk.

"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (Gao et al., 2021, GradCache).
A contrastive loss compares every example with every other, so the batch cannot be cut into separately
differentiated pieces (`optax.MultiSteps` / `grad_accum_steps` averages the losses of k smaller batches:
each anchor then sees B/k − 1 negatives, a different objective). The loss itself needs only the
embeddings (and the similarity engines keep it O(B·D)); what grows with the batch is the encoders'
activations. With the batch X cut into chunks X_1 … X_k and e_c = f(θ, X_c):

    1. e_c = f(θ, X_c) for every chunk, no activations kept          (k forwards)
    2. L, (∂L/∂θ_loss, G) = value_and_grad of L(θ, [e_1 … e_k])       (the loss, once, any engine)
    3. ∂L/∂θ = ∂L/∂θ_loss + Σ_c J_f(θ, X_c)ᵀ G_c                        (k forwards again + k backwards)

Step 3 re-runs each chunk's forward under `jax.vjp` and pulls its slice G_c of the embedding gradient
back to the parameters, so one chunk's activations are alive at a time: activation memory ≈ 1/k, for
one extra forward of compute. The result equals `jax.value_and_grad` of the unchunked loss wherever
f(θ, X_c) is what f(θ, X) gives for those rows: row-wise encoders (layer norm, attention within an
example). Two exceptions, both as in GradCache:
- BatchNorm normalises each chunk by the chunk's own statistics (the encoder sees batches of B/k);
  `embed_has_aux=True` returns each chunk's aux (such as updated running statistics), stacked over the
  chunks in order, for the caller to use.
- Randomness (dropout, stochastic depth): with `key=`, chunk c gets `jax.random.fold_in(key, c)` in
  both passes, so both see the same masks; the masks differ from an unchunked run's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["value_and_grad", "to_chunks", "from_chunks"]


def _check(chunks: int, shards: int) -> None:
  for name, value in (("chunks", chunks), ("shards", shards)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _batch_size(batch: Any, chunks: int, shards: int) -> int:
  """B, the common leading size of the batch's arrays; B must split into `shards` × `chunks` pieces."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("`batch` must hold at least one array (leading axis: the examples), got none.")
  sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every array of `batch` must have the same leading (example) axis, got sizes "
                     f"{sorted(str(s) for s in sizes)}.")
  (size,) = sizes
  if size % (chunks * shards):
    raise ValueError(f"`chunks`={chunks} must divide the batch of {size} examples"
                     + (f" on each of the `shards`={shards} shards ({size} / {shards} per shard)"
                        if shards > 1 else "") + ".")
  return size


def to_chunks(x: jax.Array, chunks: int, shards: int = 1) -> jax.Array:
  """(B, ...) -> (chunks, B / chunks, ...): chunk c holds the c-th 1/chunks of each of the `shards`
  contiguous pieces of the batch axis (the pieces a batch-sharded array keeps on each device), so every
  chunk takes the same number of rows from every device and chunking moves no data between devices.

  >>> to_chunks(jnp.arange(8), chunks=2, shards=2).tolist()  # shards [0 1 2 3], [4 5 6 7]
  [[0, 1, 4, 5], [2, 3, 6, 7]]
  """
  rest = x.shape[1:]
  rows = x.shape[0] // (shards * chunks)
  x = jnp.reshape(x, (shards, chunks, rows) + rest)
  return jnp.reshape(jnp.swapaxes(x, 0, 1), (chunks, shards * rows) + rest)


def from_chunks(y: jax.Array, shards: int = 1) -> jax.Array:
  """The inverse of `to_chunks`: (chunks, B / chunks, ...) -> (B, ...) in the batch's order.

  >>> from_chunks(to_chunks(jnp.arange(8), chunks=2, shards=2), shards=2).tolist()
  [0, 1, 2, 3, 4, 5, 6, 7]
  """
  chunks, rest = y.shape[0], y.shape[2:]
  rows = y.shape[1] // shards
  y = jnp.reshape(y, (chunks, shards, rows) + rest)
  return jnp.reshape(jnp.swapaxes(y, 0, 1), (shards * chunks * rows,) + rest)


def value_and_grad(
    embed: Callable[..., Any],
    loss: Callable[..., Any],
    *,
    chunks: int,
    shards: int = 1,
    has_aux: bool = False,
    embed_has_aux: bool = False,
    unroll: bool = False,
) -> Callable[..., Any]:
  """`jax.value_and_grad` of θ ↦ loss(θ, embed(θ, batch), *args), the encoder run `chunks` chunks at a
  time (module docstring: the three steps, memory, BatchNorm and randomness).

  Args:
    embed: `embed(params, chunk)` (or `embed(params, chunk, key)` when the returned function gets a
      `key`) -> a pytree of embeddings whose arrays have the chunk's examples on axis 0 (one tower:
      both views; two towers: image and text), or `(embeddings, aux)` with `embed_has_aux`.
    loss: `loss(params, embeddings, *args)` -> scalar (or `(scalar, aux)` with `has_aux`), over the
      whole batch's embeddings, in the batch's order; `params` for what the loss learns itself (a
      temperature, a bias), any engine (under a mesh the sharded ones).
    chunks: k, the number of chunks; it must divide the examples of each shard.
    shards: the number of contiguous pieces the batch axis is split into over devices (the product of
      the batch mesh axes; 1 without a mesh): each chunk takes 1/k of every piece, so chunking stays on
      each device (`to_chunks`).
    has_aux, embed_has_aux: as above; with either, the value is `(loss, aux)` where aux is a dict with
      "loss" (the loss's aux) and/or "embed" (each chunk's aux, stacked over the chunks in order).
    unroll: write the k chunks' steps out instead of running them as loops (`jax.lax.scan`), still
      one chunk at a time (each chunk is sliced at an index that depends on the previous chunk's
      results), for the same memory; the program is k times longer to compile. For backends that run
      some operations slowly inside loop bodies: XLA:CPU computes convolution gradients inside a loop
      about 10x slower (experiments/bench_grad_cache.py: ResNet-18 unrolled is as fast as without
      caching).

  Returns:
    `f(params, batch, *args, key=None)` -> `(value, grads)` as `jax.value_and_grad` gives, grads in the
    parameters' dtypes (accumulated in float32 for floating parameters).

  >>> import numpy as np
  >>> from jaxcl import losses
  >>> params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
  >>> batch = {"a": jnp.ones((8, 4)) + jnp.arange(8.0)[:, None], "b": jnp.cos(jnp.arange(32.0)).reshape(8, 4)}
  >>> embed = lambda p, x: {k: jnp.tanh(v @ p["w"]) for k, v in x.items()}
  >>> clip = lambda p, e: losses.clip(e["a"], e["b"], logit_scale=10.0)
  >>> value, grads = value_and_grad(embed, clip, chunks=4)(params, batch)
  >>> want, want_grads = jax.value_and_grad(lambda p: clip(p, embed(p, batch)))(params)
  >>> bool(jnp.allclose(value, want)), bool(jnp.allclose(grads["w"], want_grads["w"], atol=1e-5))
  (True, True)
  """
  _check(chunks, shards)

  def run(params, batch, *args, key=None):
    _batch_size(batch, chunks, shards)
    # (shards, chunks, rows, ...) views of the batch (a reshape: no copy, each shard stays on its
    # device); chunk c is sliced out inside the loops, so no chunk-major copy of the batch is made.
    pieces = jax.tree.map(lambda x: _split(jnp.asarray(x), chunks, shards), batch)

    def forward(p, chunk, c):
      out = embed(p, chunk) if key is None else embed(p, chunk, jax.random.fold_in(key, c))
      return out if embed_has_aux else (out, None)

    # 1. every chunk's embeddings, no activations kept (nothing here is differentiated)
    def embed_chunk(_, chunk, c):
      return None, forward(jax.lax.stop_gradient(params), chunk, c)

    _, (stacked, embed_aux) = _over_chunks(embed_chunk, None, pieces, chunks, unroll)
    embeddings = jax.tree.map(lambda y: from_chunks(y, shards), stacked)

    # 2. the loss over the whole batch, and its gradient in the loss's own parameters and the embeddings
    (value, loss_aux), (loss_grads, embedding_grads) = jax.value_and_grad(
        lambda p, e: _with_aux(loss(p, e, *args), has_aux), argnums=(0, 1), has_aux=True)(params, embeddings)
    chunk_grads = jax.tree.map(lambda g: _split(g, chunks, shards), embedding_grads)

    # 3. each chunk's forward again under vjp, its slice of the embedding gradient pulled back
    def pull_back(total, chunk_and_grads, c):
      chunk, chunk_grad = chunk_and_grads
      _, vjp = jax.vjp(lambda p: forward(p, chunk, c)[0], params)
      (grads,) = vjp(chunk_grad)
      return jax.tree.map(lambda t, d: t + d.astype(t.dtype), total, grads), None

    total, _ = _over_chunks(pull_back, jax.tree.map(_accumulator, loss_grads), (pieces, chunk_grads), chunks,
                            unroll)
    grads = jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), total, params)
    if not (has_aux or embed_has_aux):
      return value, grads
    aux = {}
    if has_aux:
      aux["loss"] = loss_aux
    if embed_has_aux:
      aux["embed"] = embed_aux
    return (value, aux), grads

  return run


def _over_chunks(body, carry, pieces, chunks: int, unroll: bool):
  """`jax.lax.scan` of `body(carry, chunk_c, c) -> (carry, out_c)` over c = 0 … k−1, chunk_c the c-th
  chunk of the `_split` arrays `pieces`; returns (carry, outs stacked on a new axis 0).

  Unrolled, the k steps are written out, and chunk c+1 is sliced at an index that depends on step c's
  results (the carry and out_c; `_after`): the compiler cannot overlap two chunks, so one chunk's
  activations are alive at a time, as in the loop.
  """
  if not unroll:
    return jax.lax.scan(lambda t, c: body(t, jax.tree.map(lambda x: _take(x, c), pieces), c), carry,
                        jnp.arange(chunks))
  outs, done = [], None
  for c in range(chunks):
    index = jnp.asarray(c)
    if done is not None:
      index = _after(done, index)
    chunk = jax.tree.map(lambda x: _take(x, index), pieces)
    carry, out = body(carry, chunk, jnp.asarray(c))
    outs.append(out)
    done = (carry, out)
  return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _after(done, index: jax.Array) -> jax.Array:
  """`index`, computed only once every array of `done` is: one element of each is added up, and a NaN
  sum (possible only when `done` already holds a NaN) selects 0 instead, which the compiler cannot
  prove never happens. A data dependence, unlike `jax.lax.optimization_barrier`, which XLA:CPU drops
  before it schedules."""
  leaves = [x for x in jax.tree.leaves(done) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  probe = sum(jnp.real(jnp.reshape(x, (-1,))[0]).astype(jnp.float32) for x in leaves)
  return jnp.where(jnp.isnan(probe), 0, index)


def _split(x: jax.Array, chunks: int, shards: int) -> jax.Array:
  """(B, ...) -> (shards, chunks, B / (shards·chunks), ...): `to_chunks` before its transpose."""
  return jnp.reshape(x, (shards, chunks, x.shape[0] // (shards * chunks)) + x.shape[1:])


def _take(x: jax.Array, c: jax.Array) -> jax.Array:
  """Chunk c of a `_split` array, (shards · rows, ...): `to_chunks(...)[c]`, sliced without a copy of
  the others."""
  part = jax.lax.dynamic_index_in_dim(x, c, axis=1, keepdims=False)
  return jnp.reshape(part, (part.shape[0] * part.shape[1],) + part.shape[2:])


def _with_aux(out, has_aux: bool):
  return out if has_aux else (out, None)


def _accumulator(g: jax.Array) -> jax.Array:
  """The running sum of a parameter's gradient: float32 for floating parameters of lower precision."""
  if jnp.issubdtype(g.dtype, jnp.floating) and jnp.finfo(g.dtype).bits < 32:
    return g.astype(jnp.float32)
  return g
