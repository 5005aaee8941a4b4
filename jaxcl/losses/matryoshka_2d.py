"""Two-dimensional Matryoshka: one loss over nested (layer, feature-prefix) sub-models.

2D Matryoshka Sentence Embeddings (2DMSE) and Starbucks apply a loss to the embeddings of several
encoder depths, each cut to several feature sizes, so that a shallower and narrower encoder can be
used at inference time. Built on `jaxcl.losses.matryoshka` (the 1-D, feature-prefix-only version).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl.losses import _common
from jaxcl.losses.matryoshka import _argument_names, _check_dims, _check_weights

# Starbucks' (layer, dimension) schedule for 12-layer, 768-wide BERT-base encoders.
STARBUCKS_PAIRS = ((2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768))


def _is_layered(x: Any) -> bool:
  return (
      hasattr(x, "ndim") and hasattr(x, "dtype") and x.ndim >= 3
      and jnp.issubdtype(x.dtype, jnp.floating)
  )


def _check_pairs(pairs: Any) -> tuple[tuple[int, int], ...]:
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not len(pairs):
    raise ValueError(f"`pairs` must be a non-empty sequence of (layer, dim) int pairs, got {pairs!r}.")
  out = []
  for p in pairs:
    if (
        not isinstance(p, Sequence) or len(p) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in p)
    ):
      raise ValueError(f"`pairs` must hold (layer, dim) pairs of ints, got {p!r} in {list(pairs)}.")
    layer, dim = int(p[0]), int(p[1])
    if layer < 0 or dim <= 0:
      raise ValueError(f"`pairs` needs layer >= 0 and dim > 0, got ({layer}, {dim}).")
    out.append((layer, dim))
  if len(set(out)) != len(out):
    raise ValueError(f"`pairs` must not repeat a (layer, dim) pair, got {out}.")
  return tuple(out)


@_common.keyword_only
def layer_kl(
    shallow: jax.Array,
    final: jax.Array,
    *,
    temperature: float | jax.Array = 0.3,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""The self-distillation term of 2DMSE / Starbucks: a shallow layer's embedding distribution pulled
  towards the final layer's, averaged over the embeddings.

  With p_i = softmax(final_i / τ) over the features (a fixed target: no gradient flows into `final`)
  and q_i = softmax(shallow_i / τ), over the N embeddings i (every leading axis):

      layer_kl = (1/N) Σ_i KL(p_i ‖ q_i) = (1/N) Σ_i Σ_k p_ik (log p_ik − log q_ik)

  (PyTorch's `kl_div(log q, p, reduction="batchmean")`, the form of sentence-transformers'
  `AdaptiveLayerLoss`, the 2DMSE authors' integration; the wrappers below scale it by τ · kl_weight).

  Args:
    shallow: (..., D) embeddings of a shallow layer (possibly cut to a feature prefix).
    final: (..., D) embeddings of the final layer, same shape.
    temperature: τ > 0 (0.3 in sentence-transformers).
    reduction: "mean", "sum" or "none": the per-embedding KL(p_i ‖ q_i), of shape shallow.shape[:-1].
    mask: None or bool of shape shallow.shape[:-1] ((B,) for (B, D) inputs): False marks padding
      embeddings, left out (N is then the number of valid ones).
  Returns:
    Float32 scalar >= 0; 0 when the two layers agree. shallow.shape[:-1] with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> float(layer_kl(jnp.ones((2, 3)), jnp.ones((2, 3))))
  0.0
  """
  _checks.check_same_shape("shallow", shallow, "final", final)
  _checks.check_positive("temperature", temperature)
  _common.check_reduction(reduction)
  lead = jnp.shape(shallow)[:-1]
  mask = _embedding_mask(mask, lead)
  log_q = jax.nn.log_softmax(jnp.asarray(shallow).astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.lax.stop_gradient(
      jax.nn.log_softmax(jnp.asarray(final).astype(jnp.float32) / temperature, axis=-1))
  return _common.reduce_loss(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), reduction, mask)


def _embedding_mask(mask, lead: tuple[int, ...]) -> jax.Array | None:
  """None, or a bool mask with one flag per embedding (shape `lead`)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != lead:
    raise ValueError(f"`mask` must have shape {lead} (one flag per embedding), got shape {mask.shape}.")
  return _common.sample_mask(mask.reshape(-1), mask.size).reshape(lead)


def _row_mask(mask: jax.Array, x: jax.Array, name: str) -> jax.Array:
  """The (B,) sample mask spread over the embeddings x[..., :] of one layer: along axis 0 when x has B
  rows there ((B, D), (B, V, D)), else along axis −2 ((V, B, D))."""
  lead, b = x.shape[:-1], mask.shape[0]
  axis = 0 if lead[0] == b else len(lead) - 1 if lead[-1] == b else None
  if axis is None:
    raise ValueError(
        f"`mask` of shape {mask.shape} matches neither axis 0 nor axis −2 of one layer of `{name}` "
        f"(shape {x.shape}): the batch must be one of them."
    )
  shape = [1] * len(lead)
  shape[axis] = b
  return jnp.broadcast_to(mask.reshape(shape), lead)


def _check_kl(kl_weight, kl_temperature) -> None:
  _checks.check_non_negative("kl_weight", kl_weight)
  _checks.check_positive("kl_temperature", kl_temperature)


def _nested_2d(loss_fn: Callable, pairs: tuple[tuple[int, int], ...], weights, kl_weight=0.0,
               kl_temperature=0.3, kl_cut: bool = False) -> Callable:
  @functools.wraps(loss_fn)
  def nested_loss(*args, **kwargs):
    names = _argument_names(loss_fn, args)
    layered = [(n, a) for n, a in zip(names, args) if _is_layered(a)]
    layered += [(n, a) for n, a in kwargs.items() if _is_layered(a)]
    if not layered:
      raise ValueError(
          "the 2-D Matryoshka wrapper found no floating array argument of rank >= 3 (layers first) to "
          f"index; got argument shapes {[jnp.shape(a) for a in args]} and keywords {sorted(kwargs)}."
      )
    max_layer = max(p[0] for p in pairs)
    max_dim = max(p[1] for p in pairs)
    for name, a in layered:
      if a.shape[0] <= max_layer:
        raise ValueError(
            f"a (layer, dim) pair asks for layer {max_layer} but `{name}` has only {a.shape[0]} layers "
            f"along axis 0 (shape {a.shape})."
        )
      if a.shape[-1] < max_dim:
        raise ValueError(
            f"a (layer, dim) pair asks for {max_dim} features but `{name}` has only {a.shape[-1]} "
            f"(shape {a.shape})."
        )
    cut = lambda x, l, d: x[l, ..., :d] if _is_layered(x) else x
    reduction = kwargs.get("reduction", "mean")
    mask = kwargs.get("mask")
    no_kl = isinstance(kl_weight, (int, float)) and kl_weight == 0

    def grid(reduction):
      total = jnp.zeros((), jnp.float32)
      for (l, d), c in zip(pairs, weights):
        kw = {k: cut(v, l, d) for k, v in kwargs.items()}
        if "reduction" in kwargs or reduction != "mean":
          kw["reduction"] = reduction
        value = loss_fn(*[cut(a, l, d) for a in args], **kw)
        total = total + jnp.asarray(c, jnp.float32) * jnp.asarray(value, jnp.float32)
      return total

    total = grid(reduction)
    if no_kl:
      return total
    # Self-distillation: every pair below the final layer (axis 0's last entry) towards the final layer,
    # over the rows of all layered arguments together (full width, or cut to the pair's dim).
    # 2DMSE: once per shallow layer, full width; Starbucks: once per pair, at the pair's width.
    # With a mask, over the valid rows only.
    kl_total = jnp.zeros((), jnp.float32)
    for l, d in (pairs if kl_cut else dict.fromkeys((l, None) for l, _ in pairs)):
      width = d
      rows = [(n, a[l, ..., :width], a[-1, ..., :width]) for n, a in layered if l != a.shape[0] - 1]
      if not rows:
        continue
      kl_sum, count = 0.0, 0.0
      for name, s, f in rows:
        m = None if mask is None else _row_mask(jnp.asarray(mask), s, name)
        kl_sum = kl_sum + layer_kl(s, f, temperature=kl_temperature, reduction="sum", mask=m)
        count = count + (s.size // s.shape[-1] if m is None else jnp.sum(m, dtype=jnp.float32))
      kl_total = kl_total + kl_sum / jnp.maximum(count, 1.0)
    kl_term = kl_temperature * kl_weight * kl_total
    if reduction == "mean":
      return total + kl_term
    # Per anchor, the KL term (a mean over rows) is added to every valid anchor's loss, so that the
    # per-anchor losses still average to the default value.
    call = lambda *a: grid("none")
    n_anchors = jax.eval_shape(call).shape[0] if reduction == "sum" else total.shape[0]
    if mask is None:
      valid = jnp.ones((n_anchors,), jnp.float32)
    else:
      b = jnp.shape(mask)[0]
      if n_anchors % b:
        raise ValueError(
            f"`loss_fn` returned {n_anchors} per-anchor losses, not a multiple of the batch size {b} of "
            "`mask`: the self-distillation term cannot be spread over its anchors (use kl_weight=0)."
        )
      valid = jnp.tile(jnp.asarray(mask), n_anchors // b).astype(jnp.float32)
    if reduction == "sum":
      return total + kl_term * jnp.sum(valid)
    return total + kl_term * valid

  return nested_loss


@_common.keyword_only
def matryoshka_2d(
    loss_fn: Callable[..., jax.Array],
    layers: Sequence[int],
    dims: Sequence[int],
    weights: Sequence[float] | jax.Array | None = None,
    *,
    kl_weight: float | jax.Array = 1.0,
    kl_temperature: float | jax.Array = 0.3,
) -> Callable[..., jax.Array]:
  r"""Wraps a loss into its 2D-Matryoshka form: the weighted sum over layers × nested feature prefixes.

  "2D Matryoshka Sentence Embeddings" (Li et al., 2024). With per-layer embeddings x^(l) (e.g. the
  pooled hidden states of every encoder layer), layers l ∈ 𝓛 and feature sizes m ∈ M:

      L_2D(x, y, ...) = Σ_{l ∈ 𝓛} Σ_{m ∈ M} c_{l,m} · loss_fn(x^(l)[..., :m], y^(l)[..., :m], ...)
                        + τ_kl · w_kl · Σ_{l ∈ 𝓛, l ≠ L} layer_kl(x^(l), x^(L); τ_kl)

  where L is the final layer (the last entry of axis 0) and `layer_kl` pulls each shallow layer's
  feature distribution softmax(x^(l)/τ_kl) towards the final layer's (a fixed target), over the rows
  of every layered argument together, at full width (2DMSE's self-distillation term as
  sentence-transformers' `AdaptiveLayerLoss` implements it: w_kl = 1, τ_kl = 0.3, the defaults here;
  `kl_weight=0` drops it). 2DMSE samples one shallow layer per step next to the last layer; this
  function is the deterministic sum over the given grid, whose expectation that sampling estimates
  when `weights` are the sampling probabilities. The returned function has `loss_fn`'s signature; every floating
  array argument of rank >= 3 carries the layer axis first ((L, B, D), e.g. Hugging Face
  `hidden_states` where index 0 is the embedding layer and index l the output of layer l) and is
  indexed [l, ..., :m]; everything else (labels, temperatures, a rank-2 weight matrix) passes through.

  `reduction=` and `mask=` (bool (B,)) pass through to `loss_fn`. With a mask the self-distillation
  term averages over the valid rows only (the mask runs along the rows of each layer, axis 1 of a
  layered argument, or along axis −2 when axis 1 is not of size B, e.g. (L, V, B, D)). With
  `reduction="none"` the result is Σ c_{l,m} · (per-anchor losses of (l, m)), plus the
  self-distillation term (a mean over rows, with no anchor of its own) added to every valid anchor, so
  that the per-anchor losses still average to the default value; "sum" is their sum. Anchors are
  matched to the mask by tiling it (the library's [view 1; view 2; ...] order), so `loss_fn`'s
  per-anchor losses must come in a multiple of B.

  Args:
    loss_fn: any jaxcl loss (or a `functools.partial` of one) returning a scalar.
    layers: layer indices along axis 0 (ints >= 0, no repeats).
    dims: strictly increasing feature sizes.
    weights: c_{l,m} >= 0 in row-major (layer, dim) order, len(layers) · len(dims) of them; None = 1.
    kl_weight: w_kl >= 0 of the self-distillation term (0: the plain grid sum).
    kl_temperature: τ_kl > 0.
  Returns:
    A function with `loss_fn`'s arguments returning the float32 scalar.

  >>> import jax.numpy as jnp
  >>> f = matryoshka_2d(lambda a: jnp.sum(a), layers=(0, 1), dims=(1, 2))
  >>> float(f(jnp.ones((2, 3, 2))))  # layer 0: 3 + 6, layer 1: 3 + 6; equal layers: no KL
  18.0
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
  dims = _check_dims(dims)
  if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
    raise ValueError(f"`layers` must be a non-empty sequence of ints >= 0, got {layers!r}.")
  pairs = _check_pairs([(l, d) for l in layers for d in dims])
  _check_kl(kl_weight, kl_temperature)
  return _nested_2d(loss_fn, pairs, _check_weights(weights, len(pairs)), kl_weight, kl_temperature)


@_common.keyword_only
def starbucks(
    loss_fn: Callable[..., jax.Array],
    pairs: Sequence[tuple[int, int]] = STARBUCKS_PAIRS,
    weights: Sequence[float] | jax.Array | None = None,
    *,
    kl_weight: float | jax.Array = 1.0,
    kl_temperature: float | jax.Array = 0.3,
) -> Callable[..., jax.Array]:
  r"""Wraps a loss into its Starbucks form: the sum over a fixed list of (layer, dim) sub-models.

  "Starbucks: Improved Training for 2D Matryoshka Embeddings" (Zhuang et al., 2024). Instead of the
  full layers × dims grid, Starbucks trains the diagonal schedule of growing (layer, dim) pairs,
  (2, 32), (4, 64), ..., (12, 768) for BERT-base (`STARBUCKS_PAIRS`):

      L = Σ_{(l, m) ∈ pairs} c_{l,m} · loss_fn(x^(l)[..., :m], y^(l)[..., :m], ...)
          + τ_kl · w_kl · Σ_{(l, m) ∈ pairs, l ≠ L} layer_kl(x^(l)[..., :m], x^(L)[..., :m]; τ_kl)

  Argument handling is that of `matryoshka_2d` (layer axis first on every floating argument of rank
  >= 3); L is the final layer (axis 0's last entry). Unlike `matryoshka_2d`, the self-distillation
  term compares the sub-model and the final layer cut to the pair's width m, as the Starbucks training
  loss does (w_kl = 1, τ_kl = 0.3 by default; `kl_weight=0` drops it). `reduction=` and `mask=` are
  handled as in `matryoshka_2d`.

  Args:
    loss_fn: any jaxcl loss returning a scalar.
    pairs: (layer, dim) pairs of ints, layer >= 0 indexing axis 0, dim > 0; no repeats.
    weights: one c >= 0 per pair; None = all 1.
    kl_weight: w_kl >= 0 of the self-distillation term.
    kl_temperature: τ_kl > 0.
  Returns:
    A function with `loss_fn`'s arguments returning the float32 scalar.

  >>> import jax.numpy as jnp
  >>> f = starbucks(lambda a: jnp.sum(a), pairs=((0, 1), (1, 2)))
  >>> float(f(jnp.ones((2, 3, 2))))  # 3 + 6
  9.0
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
  pairs = _check_pairs(pairs)
  _check_kl(kl_weight, kl_temperature)
  return _nested_2d(loss_fn, pairs, _check_weights(weights, len(pairs)), kl_weight, kl_temperature, kl_cut=True)
