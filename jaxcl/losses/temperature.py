"""Temperature schemes: per-sample learned temperatures (iSogCLR), alignment-adaptive temperature (MACL),
pair-adaptive multi-head temperatures (AMCL), focal re-weighting of the contrastive term.

| paper | function | engines |
|---|---|---|
| Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic Temperature Individualization | isogclr_state, isogclr; bimodal: isogclr_clip_state, isogclr_clip | all, allgather, ring |
| Model-Aware Contrastive Learning: Towards Escaping the Dilemmas | macl | all, allgather, ring |
| Multi-Modal Representation Learning with Text-Driven Soft Masks (focal ITC) | focal_clip | all, allgather, ring |
| Adaptive Multi-head Contrastive Learning | amcl (its temperature network: `jaxcl.models.AMCLTemperature`) | dense only: needs per-pair temperatures |
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common

sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------------------- MACL
@_common.keyword_only
@_common.shardable("z1", "z2", "mask")
def macl(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float = 0.1,
    alpha: float = 0.5,
    a0: float = 0.0,
    reweight: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MACL: NT-Xent whose temperature follows the alignment of the positives, with gradient reweighting.

  "Model-Aware Contrastive Learning: Towards Escaping the Dilemmas" (Huang et al., ICML 2023). With
  z = [z1; z2] (2B rows), p(i) the other view of row i and c_ij = <z_i, z_j> (cosine after
  normalisation):

      A    = sg( mean_i c_{i,p(i)} )                       (the alignment magnitude, no gradient)
      τ_A  = τ₀ (1 + α (A − A₀))                            (model-aware temperature)
      P_i  = exp(c_{i,p(i)}/τ_A) / Σ_{j≠i} exp(c_ij/τ_A)    (probability of the positive)
      loss = mean_i −sg(V_i) log P_i,   V_i = 1 / (1 − P_i)  (reweighting; V = 1 when `reweight=False`)

  The reweighting undoes the gradient-reduction factor (1 − P_i) of InfoNCE. The formula and the
  defaults τ₀ = 0.1, α = 0.5, A₀ = 0 follow the `MACLLoss` of the lightly library (an implementation of
  this paper; the 2B views with every j ≠ i in the denominator, as in SimCLR; the authors' own snippet,
  chenhaoxing/MACL `macl.py`, writes the same τ_A and V on the one-direction B × B cross-view matrix).
  With α = 0 and `reweight=False` this is `nt_xent` at temperature τ₀.

  Engine form: one log-sum-exp over the negatives N_i = log Σ_{j∉{i,p(i)}} exp(c_ij/τ_A) (the DCL mask);
  with L_i = logaddexp(c_{i,p(i)}/τ_A, N_i) (all j ≠ i), −log P_i = L_i − c_{i,p(i)}/τ_A and
  V_i = 1/(1 − P_i) = exp(L_i − N_i); the weighted term is computed from N_i − c_{i,p(i)}/τ_A without
  forming V_i, which overflows once P_i rounds to 1. Every engine applies.

  Args:
    z1, z2: (B, D) two views.
    temperature: τ₀ > 0 (a Python number).
    alpha: α >= 0; A₀: the alignment threshold. τ_A > 0 for every possible A ∈ (−1, 1] needs
      α (1 + |A₀|) <= 1 (checked; α = 1, A₀ = 0 is the authors' linear variant, τ_A = τ₀ (1 + A)).
    reweight: apply V_i.
    normalize: L2-normalise first (A is a mean cosine only then).
    reduction: "mean", "sum" or "none" (the (2B,) per-anchor losses in the order [z1; z2]; this
      device's under `axis_name`).
    mask: None or bool (B,); False marks padding samples, whose two views are neither anchors nor
      negatives and do not enter A: the loss of the unpadded batch, zero gradients on the padding.
    impl: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch split over
      devices (A is then the mean over the global batch).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Float32: the scalar mean (or sum) over the valid anchors, or the (2B,) per-anchor losses (0 for
    masked anchors).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)  # A = 1, τ_A = 1.5 τ₀ = 1.5 with τ₀ = 1
  >>> round(float(macl(x, x, temperature=1.0, reweight=False)), 4)  # log(e^(2/3) + 4) - 2/3
  1.1163
  """
  a, b = _common.pair("z1", z1, "z2", z2, normalize=normalize, axis_name=axis_name)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  _checks.check_temperature("temperature", temperature)
  temperature = _checks.check_scalar("temperature", temperature)
  _checks.check_non_negative("alpha", alpha)
  _checks.check_finite("a0", a0)
  if alpha * (1.0 + abs(a0)) > 1.0:
    raise ValueError(
        f"`alpha` * (1 + |a0|) must be <= 1 so that the temperature stays positive for any alignment in "
        f"(-1, 1], got alpha={alpha} and a0={a0}."
    )
  z = jnp.concatenate([a, b], axis=0)
  valid = None if mask is None else jnp.concatenate([mask, mask])
  n = z.shape[0]
  pos = _common.rowwise_dot(z, jnp.roll(z, n // 2, axis=0))
  alignment = _common.reduce_loss(sg(pos), "mean", valid, axis_name)  # A: the mean over valid anchors
  tau_a = temperature * (1.0 + alpha * (alignment - a0))
  inv_t = 1.0 / tau_a
  ids = jnp.tile(_common.batch_ids(n // 2, axis_name), 2)  # both views of a sample share its id
  negatives = ops.logsumexp(z, z, scale=inv_t, exclude=(ids, ids), row_valid=valid, col_valid=valid,
                            impl=impl, axis_name=axis_name).rows
  margin = _common.zero_invalid(negatives, valid) - inv_t * pos  # −d_i = N_i − pos_i/τ_A
  per_anchor = _reweighted_nll(margin) if reweight else jax.nn.softplus(margin)
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)


def _reweighted_nll(margin: jax.Array) -> jax.Array:
  r"""sg(V) · (−log P) of MACL from m = N − pos/τ_A = −d, without overflow at any temperature.

  With P = σ(d): −log P = softplus(m) and V = 1/(1 − P) = 1 + e^{−m}. V overflows for large d (and
  inf · 0 = NaN); its value h = (1 + e^{−m}) softplus(m) is bounded (→ 1 as m → −∞):

      m >= 0:  h = (1 + e^{−m}) softplus(m)
      m < 0:   h = log1p(u) + log1p(u)/u,  u = e^{m}   (log1p(u)/u → 1 when u underflows)

  and since V · σ(m) = 1 exactly, the gradient of sg(V) · softplus(m) is that of m itself. Returned:
  h + (m − sg(m)) (value h, gradient ∇m).
  """
  m = sg(margin)
  u = jnp.exp(jnp.minimum(m, 0.0))
  safe_u = jnp.where(u > 0, u, 1.0)
  log1p_u = jnp.log1p(u)
  ratio = jnp.where(u > 0, log1p_u / safe_u, 1.0)
  h = jnp.where(m >= 0, (1.0 + jnp.exp(-jnp.maximum(m, 0.0))) * jax.nn.softplus(jnp.maximum(m, 0.0)),
                log1p_u + ratio)
  return h + (margin - m)  # (margin − m) = 0 in value: h is never added to a huge m


# ---------------------------------------------------------------------------------------------- focal
@_common.keyword_only
@_common.shardable("image", "text", "mask")
def focal_clip(
    image: jax.Array,
    text: jax.Array,
    *,
    logit_scale: float | jax.Array,
    gamma: float = 2.0,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Focal image–text contrastive loss: CLIP with each term scaled by (1 − p)^γ.

  "Multi-Modal Representation Learning with Text-Driven Soft Masks" (Park et al., CVPR 2023) replaces
  the image–text contrastive cross-entropy with a focal loss so that easy pairs contribute little. With
  S = logit_scale · image @ textᵀ, p^{i2t}_i = softmax_j(S_i·)_i and p^{t2i}_i = softmax_j(S_·i)_i:

      loss = ½ mean_i [ −(1 − p^{i2t}_i)^γ log p^{i2t}_i − (1 − p^{t2i}_i)^γ log p^{t2i}_i ]

  γ = 0 is `clip`. The focusing factor is differentiated through, as in the focal loss of Lin et al.
  Choices: hard (one-hot) targets, as in CLIP (the paper's model also distils soft targets from a
  momentum encoder, which is a training-loop concern); γ = 2 is the focal-loss default, not a value
  from the paper. p comes from the row/column log-sum-exp, so every engine applies.

  `reduction`: "mean", "sum" or "none": the (2B,) per-anchor terms (B image anchors, then B text
  anchors; this device's under `axis_name`), whose mean is the loss above. `mask`: None or bool (B,);
  False marks padding pairs, which are neither anchors nor candidates: the loss of the unpadded batch,
  zero gradients on the padding. `impl`: similarity engine; "allgather" | "ring" with `axis_name` /
  `mesh`: the batch split over devices, p from the global row and column log-sum-exps (the ring never
  gathers the keys). `axis_name`, `mesh`: see "Sharded batches" in `jaxcl.losses`.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(2)  # p = e / (e + 1), -(1 - p)² log p
  >>> round(float(focal_clip(x, x, logit_scale=1.0)), 4)  # 0.2689² · 0.3133
  0.0227
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  scale = _common.logit_scale(logit_scale)
  _checks.check_non_negative("gamma", gamma)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, i.shape[0])
  lse = ops.logsumexp(i, t, scale=scale, rows=True, cols=True, row_valid=mask, col_valid=mask, impl=impl,
                      axis_name=axis_name)
  positive = scale * _common.rowwise_dot(i, t)
  log_p = jnp.concatenate([positive - _common.zero_invalid(lse.rows, mask),
                           positive - _common.zero_invalid(lse.cols, mask)])
  if isinstance(gamma, (int, float)) and gamma == 0:
    per_anchor = -log_p
  else:
    per_anchor = _focusing(log_p, gamma) * -log_p
  valid = None if mask is None else jnp.concatenate([mask, mask])
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)


def _focusing(log_p: jax.Array, gamma) -> jax.Array:
  """(1 − p)^γ from log p, with finite gradients where p rounds to 1.

  1 − p = −expm1(min(log p, 0)): log p can round above 0 at large logit scales, where expm1's
  derivative overflows. At 1 − p = 0 the factor is 0^γ with gradient 0 (its limit, also for γ < 1,
  where the derivative of x^γ is infinite but (1 − p)^γ · (−log p) still vanishes like (1 − p)^{1+γ}).
  """
  one_minus_p = -jnp.expm1(jnp.minimum(log_p, 0.0))
  positive = one_minus_p > 0
  at_zero = jnp.asarray(gamma == 0, jnp.float32)  # 0^0 = 1
  return jnp.where(positive, jnp.power(jnp.where(positive, one_minus_p, 1.0), gamma), at_zero)


# ---------------------------------------------------------------------------------------------- iSogCLR
class IsogclrState(NamedTuple):
  """Per-example state of iSogCLR, every array indexed by a stable example id in [0, N).

  log_u: log of the moving average u of each anchor's negative-pair term g_i (−inf = never seen), kept
  in the log domain because e^(c/τ) overflows float32 for τ below about 0.0113 (c = 1).
  tau: the individual temperature τ_i. tau_grad: moving average of its gradient.
  All three are (N,) float arrays (float32 from `isogclr_state`; a float64 state, e.g. restored from a
  float64 checkpoint with x64 enabled, is read in float32 and keeps its dtype): shard them along the
  example axis (e.g.
  `NamedSharding(mesh, P("data"))`); a step reads them with `x[ids]` and writes them with
  `x.at[ids].set(...)`, which XLA lowers to a gather/scatter on the shards that hold those ids.
  """

  log_u: jax.Array
  tau: jax.Array
  tau_grad: jax.Array


class IsogclrOutput(NamedTuple):
  """What `isogclr` returns: the scalar float32 loss and the updated state (`loss, state = out` unpacks)."""

  loss: jax.Array
  state: IsogclrState


@_common.keyword_only
def isogclr_state(num_examples: int, *, tau_init: float = 0.1) -> IsogclrState:
  """The initial iSogCLR state for a data set of `num_examples` examples: log u = −inf (never seen),
  τ = tau_init.

  >>> isogclr_state(3).tau.tolist()
  [0.10000000149011612, 0.10000000149011612, 0.10000000149011612]
  """
  if not isinstance(num_examples, int) or num_examples < 1:
    raise ValueError(f"`num_examples` must be a positive int, got {num_examples!r}.")
  _checks.check_positive("tau_init", tau_init)
  zeros = jnp.zeros((num_examples,), jnp.float32)
  return IsogclrState(log_u=jnp.full((num_examples,), -jnp.inf, jnp.float32),
                      tau=jnp.full((num_examples,), tau_init, jnp.float32), tau_grad=zeros)


def _loss_and_state_out_specs(output_type):
  """`out_specs` of a (loss, state) output over a mesh (`isogclr`, `isogclr_clip`): the loss like
  `reduction`, the full state replicated."""
  return lambda batch_spec, reduction: output_type(
      loss=batch_spec if reduction == "none" else PartitionSpec(), state=PartitionSpec())


@_common.keyword_only
@_common.shardable("z1", "z2", "ids", "mask", out_specs=_loss_and_state_out_specs(IsogclrOutput))
def isogclr(
    z1: jax.Array,
    z2: jax.Array,
    ids: jax.Array,
    state: IsogclrState,
    *,
    gamma: float = 0.9,
    rho: float = 0.3,
    eta: float = 0.01,
    beta: float = 0.9,
    tau_min: float = 0.05,
    tau_max: float = 0.7,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> IsogclrOutput:
  r"""iSogCLR: global contrastive loss with individual learned temperatures (unimodal, two views).

  "Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic Temperature
  Individualization" (Qiu et al., ICML 2023). The objective (a DRO-robust global contrastive loss) is

      F(w, τ) = (1/n) Σ_i [ τ_i log E_{z ∈ S_i⁻} exp( (h_i(z) − h_i(x_i⁺)) / τ_i ) + τ_i ρ ]

  with h_i(z) = <E(x_i), E(z)> (cosine). Per step, for each anchor a of [z1; z2] (both views of the
  batch; 2(B−1) negatives: every other example's two views) with temperature τ = τ[ids]:

      g_a   = (1/2(B−1)) Σ_{j ∈ neg(a)} exp(c_aj / τ)                       c = cosine similarity
      u_a   = (1 − γ) u[id] + γ g_a          (u_a = g_a where u[id] is unseen: the first visit)
      loss  = mean_{a < 2B} [ −c_{a,p(a)} + (1/2(B−1)) Σ_j sg(exp(c_aj/τ) / u_a) c_aj ]
      ∇_τ   = log u_a + ρ − (1/2(B−1)) Σ_j sg(exp(c_aj/τ)/u_a) c_aj / τ      (averaged over the 2 views)
      new u[id] = (u_view1 + u_view2) / 2
      new tau_grad[id] = (1 − β) tau_grad[id] + β ∇_τ
      new τ[id] = clip(τ[id] − η · tau_grad[id], τ_min, τ_max)

  This follows the authors' implementation (LibAUC `GCLoss_v1` with `enable_isogclr=True`): the value
  and gradient of the returned loss are those of its `loss`, whose gradient is the moving-average
  estimator of ∇_w F (the u in the denominator is what makes small batches work). Choices: u is
  initialised per example at its first visit (LibAUC tests the whole batch at once); the temperature
  update uses its own optimiser (momentum β, step η, projection on [τ_min, τ_max]) inside this function,
  so the caller only differentiates the loss w.r.t. the network. Defaults are LibAUC's for unimodal
  tasks (τ₀ = 0.1, γ = 0.9, ρ = 0.3, η = 0.01, β = 0.9, τ ∈ [0.05, 0.7]). The loss is the mean over the
  2B anchors, like every loss of this library (LibAUC's value is the sum over both views divided by
  B, twice this; the gradient scales the same way, the temperature update does not depend on it). u is
  kept and updated as log u (`IsogclrState.log_u`, −inf until the first visit): LibAUC's u overflows
  float32 once 1/τ > 88.7, here any temperature the library accepts (>= 2^-100) stays finite.

  Engines: the negative sums are one masked log-sum-exp with a per-row scale 1/τ_a (the DCL mask), so
  every engine applies. The softmax-weighted similarity Σ_j softmax_j c_aj, needed for the loss value
  and ∇_τ, is the derivative of that log-sum-exp w.r.t. its scale, obtained with one more engine pass
  (`jax.vjp` on stop-gradient inputs): about twice the cost of `dcl`.

  Duplicate ids within one batch: the scatter keeps one of the writes (unspecified which); sample
  without replacement within a batch (masked rows do not count: they write nothing).

  On a batch split over devices (`axis_name` / `mesh`, "allgather" | "ring"; z1, z2, ids and mask
  split, the state replicated) the negatives are the global batch's (engine log-sum-exps: the ring
  never gathers the keys), and every device gathers the batch's ids and updates and returns the same
  full state as the unsharded step.

  Args:
    z1, z2: (B, D) two views of B examples.
    ids: (B,) int example ids in [0, N), stable across epochs.
    state: `isogclr_state(N)` or the state returned by the previous step.
    gamma, rho, eta, beta, tau_min, tau_max: see above.
    normalize: L2-normalise first.
    reduction: "mean", "sum" or "none" (the (2B,) per-anchor losses in the order [z1; z2]; this
      device's under `axis_name`).
    mask: None or bool (B,); False marks padding samples: their two views are neither anchors nor
      negatives (B above counts the valid samples), so the loss and gradients are those of the
      unpadded batch, with zero gradients on the padding; and their state entries (log u, τ, tau_grad at
      their ids) are NOT updated: the returned state keeps the old values there. Their ids must still
      lie in [0, N) (they are read, never written).
    impl: similarity engine; "allgather" | "ring" for a batch split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    `IsogclrOutput(loss, state)`: the float32 loss (the mean over the valid anchors of the 2B, their
    sum, or the (2B,) per-anchor losses with 0 for masked anchors) and the updated `IsogclrState` (no
    gradient flows into it), in the dtype of the given state.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> loss, state = isogclr(x, x, jnp.array([0, 1, 2]), isogclr_state(5, tau_init=1.0))
  >>> round(float(loss), 4)  # each anchor: −1 + Σ_j (e^0/u) · 0 / 4 = −1
  -1.0
  >>> state.log_u.tolist()  # g = 1 for the three seen ids (first visit: u = g), unseen elsewhere
  [0.0, 0.0, 0.0, -inf, -inf]
  """
  a, b = _common.pair("z1", z1, "z2", z2, normalize=normalize, axis_name=axis_name)
  bsz = a.shape[0]
  if not isinstance(state, IsogclrState):
    raise TypeError(f"`state` must be an IsogclrState (see isogclr_state), got {type(state).__name__}.")
  ids = _check_ids_and_state(ids, bsz, state)
  _check_isogclr_hyperparameters(gamma, rho, eta, beta, tau_min, tau_max)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, bsz)
  valid = None if mask is None else jnp.concatenate([mask, mask])

  z = jnp.concatenate([a, b], axis=0)
  old = IsogclrState(*(sg(arr[ids]).astype(jnp.float32) for arr in state))  # the batch's slots, float32
  tau = jnp.tile(old.tau, 2)
  scale = 1.0 / tau
  inst = jnp.tile(_common.batch_ids(bsz, axis_name), 2)  # both views of global sample i share the id i
  exclude = (inst, inst)
  if mask is None:
    log_n = math.log(2 * (_common.global_size(bsz, axis_name) - 1))
  else:  # 2(B − 1) negatives per anchor, B the valid samples
    log_n = jnp.log(2.0 * jnp.maximum(_common.batch_sum(mask.astype(jnp.float32), axis_name) - 1.0, 1.0))

  lse, mean_sim = _negatives_lse_and_mean_similarity(z, z, scale, exclude, valid, valid, impl, axis_name)

  log_g = _common.zero_invalid(sg(lse) - log_n, valid)
  log_u = _moving_average_log_u(jnp.tile(old.log_u, 2), log_g, gamma)
  ratio = jnp.exp(log_g - log_u)  # g/u
  pos = _common.rowwise_dot(z, jnp.roll(z, bsz, axis=0))
  # Value of Σ_j w_j c_aj / n (w = e^{c/τ}/u) is (g/u)·mean_sim; its gradient (w fixed) is that of
  # τ (g/u) · lse.
  weighted = ratio * mean_sim
  surrogate = sg(tau * ratio) * lse
  per_anchor = -pos + sg(weighted) + surrogate - sg(surrogate)
  loss = _common.reduce_loss(per_anchor, reduction, valid, axis_name)

  grad_tau = log_u + rho - weighted / tau
  grad_tau = 0.5 * (grad_tau[:bsz] + grad_tau[bsz:])
  new_log_u = jnp.logaddexp(log_u[:bsz], log_u[bsz:]) - math.log(2.0)  # log of the two views' mean u
  tau_grad, new_tau = _temperature_step(old.tau, old.tau_grad, grad_tau, eta, beta, tau_min, tau_max)
  written = _written_ids(ids, mask, state.log_u.shape[0])
  new_state = IsogclrState(*(
      _write(arr, written, sg(new), axis_name) for arr, new in zip(state, (new_log_u, new_tau, tau_grad))
  ))
  return IsogclrOutput(loss, new_state)


class IsogclrClipState(NamedTuple):
  """Per-example state of bimodal iSogCLR (`isogclr_clip`): one set per modality, every array (N,)
  indexed by a stable example id (the pair's), sharded and read/written like `IsogclrState`.

  image_log_u, text_log_u: log of the moving average u of each anchor's negative term (see
  `isogclr_clip`), kept in the log domain because exp(h/τ) overflows float32 at the bimodal
  temperatures (τ >= 0.005, h up to 2); −inf = never seen. image_tau, text_tau: the individual
  temperatures τ_i, τ'_i. image_tau_grad, text_tau_grad: the moving averages of their gradients.
  """

  image_log_u: jax.Array
  image_tau: jax.Array
  image_tau_grad: jax.Array
  text_log_u: jax.Array
  text_tau: jax.Array
  text_tau_grad: jax.Array


class IsogclrClipOutput(NamedTuple):
  """What `isogclr_clip` returns: the scalar float32 loss and the updated state (`loss, state = out`)."""

  loss: jax.Array
  state: IsogclrClipState


@_common.keyword_only
def isogclr_clip_state(num_examples: int, *, tau_init: float = 0.01) -> IsogclrClipState:
  """The initial bimodal iSogCLR state for `num_examples` image–text pairs: u unseen (log u = −inf),
  τ = τ' = tau_init (0.01: LibAUC `GCLoss_v2`'s default and the authors' CLIP runs' `--tau_init`).

  >>> s = isogclr_clip_state(2)
  >>> s.text_log_u.tolist(), [round(t, 4) for t in s.image_tau.tolist()]
  ([-inf, -inf], [0.01, 0.01])
  """
  if not isinstance(num_examples, int) or num_examples < 1:
    raise ValueError(f"`num_examples` must be a positive int, got {num_examples!r}.")
  _checks.check_positive("tau_init", tau_init)
  unseen = jnp.full((num_examples,), -jnp.inf, jnp.float32)
  tau = jnp.full((num_examples,), tau_init, jnp.float32)
  zeros = jnp.zeros((num_examples,), jnp.float32)
  return IsogclrClipState(unseen, tau, zeros, unseen, tau, zeros)


@_common.keyword_only
@_common.shardable("image", "text", "ids", "mask", out_specs=_loss_and_state_out_specs(IsogclrClipOutput))
def isogclr_clip(
    image: jax.Array,
    text: jax.Array,
    ids: jax.Array,
    state: IsogclrClipState,
    *,
    gamma: float = 0.9,
    rho: float = 6.0,
    eta: float = 0.01,
    beta: float = 0.9,
    tau_min: float = 0.005,
    tau_max: float = 0.05,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> IsogclrClipOutput:
  r"""Bimodal iSogCLR: image–text global contrastive loss with individual learned temperatures.

  "Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic Temperature
  Individualization" (Qiu et al., ICML 2023), its image–text objective (robust global contrastive loss):

      F(w, τ, τ') = (1/n) Σ_i [ (τ_i + τ'_i) ρ + τ_i log E_{t ∈ T_i⁻} exp(h_{x_i}(t)/τ_i)
                                              + τ'_i log E_{x ∈ I_i⁻} exp(h_{t_i}(x)/τ'_i) ]

  with h_{x_i}(t_j) = c_ij − c_ii, h_{t_i}(x_j) = c_ji − c_ii and c_ij = <image_i, text_j> (cosine).
  Per step, for each image anchor i of the batch (B pairs; its B − 1 negatives: the other texts) with
  τ = image_tau[ids_i]; the text anchors likewise against the other images with text_tau:

      g_i   = (1/(B−1)) Σ_{j≠i} exp((c_ij − c_ii)/τ)
      u_i   = (1 − γ) u[id] + γ g_i            (u_i = g_i at the first visit)
      ℓ_i   = (1/(B−1)) Σ_{j≠i} sg(exp((c_ij − c_ii)/τ) / u_i) (c_ij − c_ii)
      ∇_τ   = log u_i + ρ − (1/(B−1)) Σ_{j≠i} sg(exp((c_ij − c_ii)/τ) / u_i) (c_ij − c_ii)/τ
      loss  = mean of ℓ over the B image and the B text anchors
      new u[id] = u_i;  tau_grad[id] ← (1 − β) tau_grad[id] + β ∇_τ;  τ[id] ← clip(τ − η tau_grad[id], τ_min, τ_max)

  This follows the authors' implementation, LibAUC `GCLoss_v2` with `enable_isogclr=True`
  (temperature_scheme "individual_learnable"): the gradient of the loss is the moving-average estimator
  of ∇_w F, and its defaults are this function's: τ₀ = 0.01 (`isogclr_clip_state`), γ = 0.9, ρ = 6,
  η = 0.01, β = 0.9, τ ∈ [0.005, 0.05] (the authors' CC3M script, zhqiu/contrastive-learning-iSogCLR
  `bimodal_exps`, uses γ = 0.8, ρ = 8, η = 0.03). Choices, as in `isogclr`: u is initialised per
  example at its first visit, the temperatures are updated inside this function, and ℓ_i carries the
  1/(B−1) of the estimator (LibAUC's loss sums over j without it: its value and gradient are B − 1
  times these; the temperature update does not depend on it). u is kept in the log domain (LibAUC
  keeps a running max b for the same reason; its clamp u >= 1e-20 is not needed there).

  With γ = 1 (u = g) the gradient of the loss is τ times that of the decoupled (positive-free
  denominator) CLIP loss mean_i ½[log Σ_{j≠i} e^{c_ij/τ} − c_ii/τ + log Σ_{j≠i} e^{c_ji/τ'} − c_ii/τ'],
  and ∇_τ is the exact derivative of the i-th term of F in τ_i.

  Engines: per direction one masked log-sum-exp with a per-row scale 1/τ (the diagonal excluded) and
  one more pass for its derivative w.r.t. the scale (Σ_j softmax_j c_ij), so every engine applies.
  On a batch split over devices (`axis_name` / `mesh`, "allgather" | "ring"; image, text, ids and mask
  split, the state replicated) the negatives are the global batch's and every device returns the same
  full updated state. Duplicate ids within a batch: one of the writes is kept (unspecified which).

  Args:
    image, text: (B, D) paired embeddings.
    ids: (B,) int pair ids in [0, N), stable across epochs.
    state: `isogclr_clip_state(N)` or the state returned by the previous step.
    gamma, rho, eta, beta, tau_min, tau_max: see above.
    normalize: L2-normalise first.
    reduction: "mean", "sum" or "none" (the (2B,) per-anchor ℓ: B image anchors, then B text anchors;
      this device's under `axis_name`).
    mask: None or bool (B,); False marks padding pairs: neither anchors nor negatives (B above counts
      the valid pairs), zero gradients, and their state entries are not written.
    impl: similarity engine; "allgather" | "ring" for a batch split over devices.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    `IsogclrClipOutput(loss, state)`: the float32 loss and the updated `IsogclrClipState` (no gradient
    flows into it), in the dtype of the given state.

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)  # c_ij − c_ii = −1 for every negative: g = e^(−1/τ), u = g at the first visit
  >>> loss, state = isogclr_clip(x, x, jnp.array([0, 1, 2]), isogclr_clip_state(4, tau_init=1.0))
  >>> round(float(loss), 4)  # each anchor: Σ_j (g/u) (−1) / 2 = −1
  -1.0
  >>> [round(v, 4) for v in state.image_log_u.tolist()]  # log g = −1/τ, id 3 unseen
  [-1.0, -1.0, -1.0, -inf]
  """
  i, t = _common.pair("image", image, "text", text, normalize=normalize, axis_name=axis_name)
  bsz = i.shape[0]
  if not isinstance(state, IsogclrClipState):
    raise TypeError(f"`state` must be an IsogclrClipState (see isogclr_clip_state), got {type(state).__name__}.")
  ids = _check_ids_and_state(ids, bsz, state)
  _check_isogclr_hyperparameters(gamma, rho, eta, beta, tau_min, tau_max)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, bsz)
  inst = _common.batch_ids(bsz, axis_name)
  if mask is None:
    log_n = math.log(max(_common.global_size(bsz, axis_name) - 1, 1))
  else:  # B − 1 negatives per anchor, B the valid pairs
    log_n = jnp.log(jnp.maximum(_common.batch_sum(mask.astype(jnp.float32), axis_name) - 1.0, 1.0))
  pos = _common.rowwise_dot(i, t)
  old = IsogclrClipState(*(sg(arr[ids]).astype(jnp.float32) for arr in state))
  halves = []
  for anchor, key, log_u_old, tau in ((i, t, old.image_log_u, old.image_tau), (t, i, old.text_log_u, old.text_tau)):
    lse, mean_sim = _negatives_lse_and_mean_similarity(anchor, key, 1.0 / tau, (inst, inst), mask, mask, impl,
                                                       axis_name)
    halves.append(_isogclr_clip_direction(lse, mean_sim, pos, log_u_old, tau, log_n, gamma, rho, mask))
  per_anchor = jnp.concatenate([halves[0][0], halves[1][0]])
  valid = None if mask is None else jnp.concatenate([mask, mask])
  loss = _common.reduce_loss(per_anchor, reduction, valid, axis_name)

  written = _written_ids(ids, mask, state[0].shape[0])
  new = []  # in the state's order: log u, τ, tau_grad for the images, then for the texts
  for (_, log_u, grad_tau), tau, tau_grad in ((halves[0], old.image_tau, old.image_tau_grad),
                                              (halves[1], old.text_tau, old.text_tau_grad)):
    new_tau_grad, new_tau = _temperature_step(tau, tau_grad, grad_tau, eta, beta, tau_min, tau_max)
    new.extend((log_u, new_tau, new_tau_grad))
  new_state = IsogclrClipState(*(_write(arr, written, sg(v), axis_name) for arr, v in zip(state, new)))
  return IsogclrClipOutput(loss, new_state)


def _isogclr_clip_direction(lse, mean_sim, pos, log_u_old, tau, log_n, gamma, rho, valid):
  r"""(ℓ, log u, ∇_τ) of one direction of `isogclr_clip` from L = log Σ_{j≠i} e^{c_ij/τ} (with
  gradient), S = Σ_j softmax_j c_ij and the positive c_ii:

      log g = L − c_ii/τ − log(B−1);  log u = log g (unseen) or logaddexp(log(1−γ) + log u_old, log γ + log g)
      r = g/u;  ℓ = r (S − c_ii), differentiated as sg(τ r) L − sg(r) c_ii;  ∇_τ = log u + ρ − r (S − c_ii)/τ
  """
  log_g = _common.zero_invalid(sg(lse) - sg(pos) / tau - log_n, valid)
  log_u = _moving_average_log_u(log_u_old, log_g, gamma)
  ratio = jnp.exp(log_g - log_u)
  gap = mean_sim - sg(pos)  # Σ_j softmax_j (c_ij − c_ii)
  value = ratio * gap
  surrogate = sg(tau * ratio) * lse - ratio * pos
  per_anchor = _common.zero_invalid(value + surrogate - sg(surrogate), valid)
  grad_tau = log_u + rho - value / tau
  return per_anchor, log_u, grad_tau


def _moving_average_log_u(log_u_old, log_g, gamma):
  """log u of u = (1 − γ) u_old + γ g in the log domain, u = g where u_old is unseen (log u_old = −inf)."""
  log_decay = math.log1p(-gamma) if gamma < 1 else -math.inf
  log_gamma = math.log(gamma) if gamma > 0 else -math.inf
  return jnp.where(jnp.isneginf(log_u_old), log_g, jnp.logaddexp(log_decay + log_u_old, log_gamma + log_g))


def _check_ids_and_state(ids, bsz: int, state) -> jax.Array:
  """The checked (B,) ids, after checking that every array of `state` is (N,) and, where the ids are
  concrete, that they lie in [0, N)."""
  ids = _checks.check_labels("ids", ids, bsz)
  n_examples = jnp.shape(state[0])[0] if jnp.ndim(state[0]) == 1 else None
  for name, arr in zip(state._fields, state):
    if n_examples is None or jnp.shape(arr) != (n_examples,):
      raise ValueError(f"`state.{name}` must have shape ({n_examples or 'N'},), got {jnp.shape(arr)}.")
  concrete = _checks.concrete_value(ids)
  if concrete is not None and (concrete.min() < 0 or concrete.max() >= n_examples):
    raise ValueError(f"`ids` must lie in [0, {n_examples}) (the state's size), got values in "
                     f"[{concrete.min()}, {concrete.max()}].")
  return ids


def _check_isogclr_hyperparameters(gamma, rho, eta, beta, tau_min, tau_max) -> None:
  """γ, β ∈ [0, 1], η >= 0, ρ finite, 0 < τ_min <= τ_max (the unimodal and bimodal forms)."""
  for name, v in (("gamma", gamma), ("beta", beta)):
    _checks.check_non_negative(name, v)
    if v > 1:
      raise ValueError(f"`{name}` must be in [0, 1], got {v}.")
  _checks.check_non_negative("eta", eta)
  _checks.check_finite("rho", rho)
  _checks.check_positive("tau_min", tau_min)
  if tau_max < tau_min:
    raise ValueError(f"`tau_max` must be >= `tau_min`, got {tau_max} < {tau_min}.")


def _negatives_lse_and_mean_similarity(q, k, scale, exclude, row_valid, col_valid, impl, axis_name):
  r"""(L, S) per row a of q, over the valid columns j of k not excluded:

      L_a = log Σ_j exp(s_a <q_a, k_j>)      (differentiable in q and k)
      S_a = Σ_j softmax_j(s_a <q_a, k_j>) <q_a, k_j> = ∂L_a/∂s_a   (no gradient)

  S is the pullback of the engine's log-sum-exp w.r.t. its per-row scale (one more engine pass on
  stop-gradient inputs). Both are 0 on invalid rows."""
  def lse(q, k, s):
    return ops.logsumexp(q, k, scale=s, exclude=exclude, row_valid=row_valid, col_valid=col_valid,
                         impl=impl, axis_name=axis_name).rows

  rows = _common.zero_invalid(lse(q, k, scale), row_valid)
  qs, ks = sg(q), sg(k)
  _, pullback = jax.vjp(lambda s: lse(qs, ks, s), scale)
  mean_sim = _common.zero_invalid(sg(pullback(jnp.ones_like(rows))[0]), row_valid)
  return rows, mean_sim


def _temperature_step(tau, tau_grad, grad_tau, eta, beta, tau_min, tau_max):
  """iSogCLR's temperature optimiser: (new tau_grad, new τ) with
  tau_grad ← (1 − β) tau_grad + β ∇_τ and τ ← clip(τ − η · tau_grad, τ_min, τ_max)."""
  tau_grad = (1.0 - beta) * tau_grad + beta * grad_tau
  return tau_grad, jnp.clip(tau - eta * tau_grad, tau_min, tau_max)


def _written_ids(ids, mask, n_examples: int) -> jax.Array:
  """The ids a step writes: masked rows get N (out of range: `_write` drops them)."""
  return ids if mask is None else jnp.where(mask, ids, n_examples)


def _write(arr: jax.Array, ids: jax.Array, values: jax.Array, axis_name) -> jax.Array:
  """arr with arr[ids] = values (ids out of range dropped), in arr's dtype. Under `axis_name` every
  device writes the global batch's rows into its copy of the state: the ids and values are gathered
  (O(B) values sent, not the (N,) state; the pmax of identical copies marks them the same on every
  device, which an `all_gather` alone does not)."""
  if axis_name is not None:
    ids, values = (jax.lax.pmax(jax.lax.all_gather(x, axis_name, tiled=True), axis_name) for x in (ids, values))
  return arr.at[ids].set(values.astype(arr.dtype), mode="drop")


# ------------------------------------------------------------------------------------------------ AMCL
@_common.keyword_only
def amcl(
    z1: jax.Array,
    z2: jax.Array,
    temperatures: jax.Array,
    *,
    beta: float = 1e-4,
    top_k: int | None = 100,
    normalize: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""AMCL: SimCLR over several projection heads with pair-adaptive temperatures and their regulariser.

  "Adaptive Multi-head Contrastive Learning" (Wang, Koniusz, Gedeon & Zheng, ECCV 2024). For head h,
  z = [z1_h; z2_h] (2B rows, normalised), c_ab = <z_a, z_b>, τ_ab = temperatures[h, a, b] (e.g. from
  `jaxcl.models.AMCLTemperature`), p(a) the other view of a and N(a) the 2B − 2 rows that are neither a nor p(a):

      Ω(τ) = (D/2) log τ + 1/τ                                    (D = embedding size)
      ℓ_a  = −c_{a,p}/τ_{a,p} + β Ω(τ_{a,p}) + NEG_a − β Σ_{n ∈ K(a)} (log τ_an + 1/τ_an)
      log-sum-exp form (`top_k=None`):  K(a) = N(a),  NEG_a = log Σ_{n ∈ N(a)} exp(c_an / τ_an)
      top-k form (the practical one):    K(a) = the k most similar n ∈ N(a),  NEG_a = mean_{K(a)} c_an/τ_an
      loss = Σ_h mean_a ℓ_a

  The regulariser keeps the learned temperatures away from degenerate values. This follows the
  authors' released code (LeiWangR/cl, `amcl/losses.py` `AMCLNTXentLoss`: k = 100, heads summed, the two
  directions averaged; β = 1e-4, the value of their SimCLR / MoCo recipes, while the loss class alone
  defaults to 0.01 and their Barlow Twins recipe uses 1e-6); the log-sum-exp form is the expression the top-k form approximates, with the
  negative regulariser over the same set. With one head, β = 0, a constant τ and `top_k=None` it is
  `dcl(z1, z2, temperature=τ)`. The top-k selection (by c) carries no gradient; the temperatures are
  differentiated (they are the temperature network's output).

  Dense only: every pair has its own temperature from a non-linear network, which no per-row scale or
  id mask can express, so the (2B)² matrix per head is materialised.

  Args:
    z1, z2: (B, H, D) per-head embeddings of the two views.
    temperatures: (H, 2B, 2B) positive pair temperatures over the rows of [z1; z2].
    beta: regulariser weight β >= 0.
    top_k: k >= 1 for the top-k form (k is capped at 2B − 2), None for the log-sum-exp form.
    normalize: L2-normalise the embeddings first.
    reduction: "mean", "sum" or "none": the (2B,) per-anchor losses Σ_h ℓ_a (heads summed) in the
      order [z1; z2], whose mean is the loss.
    mask: None or bool (B,); False marks padding samples, whose two views are neither anchors nor
      negatives (nor among the top k): the loss of the unpadded batch (with the unpadded batch's rows
      and columns of `temperatures`), zero gradients on the padding and on its temperatures.
  Returns:
    Float32: the scalar loss (mean or sum over the valid anchors), or the (2B,) per-anchor losses (0
    for masked anchors).

  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)[:, None, :]  # one head, three orthogonal samples, identical views
  >>> round(float(amcl(x, x, jnp.ones((1, 6, 6)), beta=0.0, top_k=None)), 4)  # = dcl: log 4 - 1
  0.3863
  """
  z1 = _checks.check_array("z1", z1, ndim=3)
  z2 = _checks.check_array("z2", z2, ndim=3)
  _checks.check_same_shape("z1", z1, "z2", z2)
  _checks.check_min_batch("z1", z1, 2, why="a contrastive loss needs a negative")
  b, h, d = z1.shape
  temperatures = _checks.check_array("temperatures", temperatures, ndim=3)
  if temperatures.shape != (h, 2 * b, 2 * b):
    raise ValueError(
        f"`temperatures` must have shape (H, 2B, 2B) = ({h}, {2 * b}, {2 * b}), got {temperatures.shape}."
    )
  _checks.check_positive("temperatures", temperatures)
  _checks.check_non_negative("beta", beta)
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"`top_k` must be a positive int or None, got {top_k!r}.")
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, b)
  valid = None if mask is None else jnp.concatenate([mask, mask])
  z = jnp.swapaxes(jnp.concatenate([z1, z2], axis=0), 0, 1).astype(jnp.float32)  # (H, 2B, D)
  z = _common.maybe_normalize(z, normalize)
  tau = temperatures.astype(jnp.float32)
  n = 2 * b
  c = jnp.einsum("had,hbd->hab", z, z)
  rows = jnp.arange(n)
  partner = (rows + b) % n
  c_pos = c[:, rows, partner]
  tau_pos = tau[:, rows, partner]
  negative = (rows[:, None] != rows[None, :]) & (partner[:, None] != rows[None, :])  # (2B, 2B)
  if valid is not None:
    negative = negative & valid[None, :]  # padding is nobody's negative
  omega_pos = 0.5 * d * jnp.log(tau_pos) + 1.0 / tau_pos
  if top_k is None:
    keep = jnp.broadcast_to(negative, c.shape)
    neg = jax.nn.logsumexp(jnp.where(keep, c / tau, -jnp.inf), axis=-1)
  else:
    k_eff = min(top_k, n - 2)
    ranked = jnp.where(negative, sg(c), -jnp.inf)
    kth = jax.lax.top_k(ranked, k_eff)[0][..., -1]
    keep = negative & (ranked >= kth[..., None])
    count = jnp.maximum(jnp.sum(keep, axis=-1), 1)  # 0 only for an anchor without a valid negative
    neg = jnp.sum(jnp.where(keep, c / tau, 0.0), axis=-1) / count
  reg_neg = jnp.sum(jnp.where(keep, jnp.log(tau) + 1.0 / tau, 0.0), axis=-1)
  per_anchor = -c_pos / tau_pos + beta * omega_pos + neg - beta * reg_neg
  return _common.reduce_loss(jnp.sum(per_anchor, axis=0), reduction, valid)
