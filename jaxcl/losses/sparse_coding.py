r"""Contrastive Sparse Representation (CSR): a TopK sparse autoencoder over frozen embeddings, trained
with reconstruction losses and a contrastive loss on its sparse codes.

"Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation" (Wen, Wang, Zeng, Peng, Su,
Liu, Chen, Liu, Jegelka & You, ICML 2025). The pieces are pure functions of the autoencoder parameters

    params = {"encoder": W_enc (D, H), "latent_bias": b_enc (H,), "pre_bias": b_pre (D,),
              optionally "decoder": W_dec (H, D)}        (no "decoder": tied, W_dec = W_encᵀ)

(the parameters of `jaxcl.models.sparse_autoencoder.SparseAutoencoder`), so they run under `jit`,
`grad` and `vmap` and differentiate in the inputs and the parameters alike:

- `topk_activation`: ReLU(TopK_k(·)), the k largest entries of each row kept, the rest zeroed;
- `sae_pre_activation`, `sae_encode`, `sae_decode`: the autoencoder;
- `csr_contrastive`: the contrastive term on the (L2-normalised) sparse codes, on every engine;
- `csr`: the whole objective, returning a `CSROutput` (total and parts, and the dead-latent counters).

Both take `axis_name=` / `mesh=` with `impl="allgather" | "ring"`: the batch split over devices, the
contrastive denominators over the global batch (engine log-sum-exps: the ring never gathers the codes),
the batch statistics of `csr` (the residual's mean and variance, which latents fired) global too.

The autoencoder functions stay here, jax-only, because the CSR loss is a function of the autoencoder's
parameters; the Flax module that holds those parameters is `jaxcl.models.SparseAutoencoder`.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common

# Defaults of the authors' code (github.com/neilwen987/CSR_Adaptive_Rep, Vision/main_visual.py).
CSR_MULTI_K = 4  # the second reconstruction uses the top 4k latents ...
CSR_MULTI_K_WEIGHT = 1.0 / 8  # ... with weight 1/8 (the paper's L(k) + L(4k)/8)
CSR_AUX_K = 512  # latents in the dead-latent auxiliary reconstruction
CSR_AUX_WEIGHT = 1.0 / 32  # β
CSR_CONTRASTIVE_WEIGHT = 0.1  # γ (`cl_coef`)
CSR_TEMPERATURE = 0.2
CSR_DEAD_THRESHOLD = 10  # training steps without firing (the code counts 30 forward passes, 3 a step)
FIRE_EPS = 1e-5  # a latent "fires" when its code exceeds this (as in the authors' code)
CONTRASTIVE_FORMS = ("nt_xent", "infonce")


class CSROutput(NamedTuple):
  """What `csr` returns. Every loss is a float32 scalar (a (B,) array of per-sample terms with
  `reduction="none"`); `loss` is the one to differentiate."""

  loss: jax.Array  # L(k) + w_m·L(m·k) + β·L_aux + γ·L_cl
  reconstruction: jax.Array  # L(k)
  reconstruction_multi_k: jax.Array  # L(m·k)
  auxiliary: jax.Array  # L_aux (dead-latent residual reconstruction)
  contrastive: jax.Array  # L_cl on the sparse codes
  codes: jax.Array  # (B, H) float32 sparse codes z_k of `x` (no gradient cut: differentiable)
  steps_since_active: jax.Array  # (H,) int32 counters for the next step (no gradient)


# ------------------------------------------------------------------------------------------ validation
def _check_int(name: str, value: Any, *, low: int, high: int | None = None, why: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    reason = f" ({why})" if why else ""
    raise ValueError(f"`{name}` must be {bound}{reason}, got {value}.")
  return value


def _check_params(params: Any, d: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(W_enc (D, H), b_enc (H,), b_pre (D,), W_dec (H, D)) after checking names and shapes."""
  if not isinstance(params, Mapping):
    raise TypeError(
        "`params` must be a mapping with 'encoder' (D, H), 'latent_bias' (H,), 'pre_bias' (D,) and "
        f"optionally 'decoder' (H, D), got {type(params).__name__}."
    )
  missing = [n for n in ("encoder", "latent_bias", "pre_bias") if n not in params]
  if missing:
    raise ValueError(f"`params` is missing {missing}; it has {sorted(params)}.")
  unknown = sorted(set(params) - {"encoder", "latent_bias", "pre_bias", "decoder"})
  if unknown:
    raise ValueError(f"`params` has unknown entries {unknown}.")
  w = _checks.check_array("params['encoder']", params["encoder"], ndim=2)
  dim, hidden = w.shape
  if d is not None and dim != d:
    raise ValueError(f"`params['encoder']` must have shape ({d}, H) for inputs of size {d}, got {w.shape}.")
  b_enc = _checks.check_array("params['latent_bias']", params["latent_bias"], ndim=1)
  if b_enc.shape != (hidden,):
    raise ValueError(f"`params['latent_bias']` must have shape ({hidden},), got {b_enc.shape}.")
  b_pre = _checks.check_array("params['pre_bias']", params["pre_bias"], ndim=1)
  if b_pre.shape != (dim,):
    raise ValueError(f"`params['pre_bias']` must have shape ({dim},), got {b_pre.shape}.")
  if params.get("decoder") is None:
    w_dec = w.T
  else:
    w_dec = _checks.check_array("params['decoder']", params["decoder"], ndim=2)
    if w_dec.shape != (hidden, dim):
      raise ValueError(f"`params['decoder']` must have shape ({hidden}, {dim}), got {w_dec.shape}.")
  return w, b_enc, b_pre, w_dec


# ------------------------------------------------------------------------------------ the autoencoder
@_common.keyword_only
def topk_mask(pre: jax.Array, k: int, *, valid: jax.Array | None = None) -> jax.Array:
  """Boolean (..., H) mask of the k largest entries of each row (among the `valid` ones).

  Ties go to the lower index (`jax.lax.top_k`). Where fewer than k entries are valid, only those are set.

  >>> topk_mask(jnp.array([[3.0, -1.0, 2.0]]), 2).tolist()
  [[True, False, True]]
  """
  pre = _checks.check_array("pre", pre, ndim=(1, 2))
  hidden = pre.shape[-1]
  k = _check_int("k", k, low=1, high=hidden, why=f"at most the {hidden} latents")
  scores = pre if valid is None else jnp.where(valid, pre, -jnp.inf)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
  mask = jnp.zeros(pre.shape, bool)
  if pre.ndim == 1:
    mask = mask.at[idx].set(True)
  else:  # a scatter, never a (B, k, H) one-hot
    mask = mask.at[jnp.arange(pre.shape[0])[:, None], idx].set(True)
  return mask if valid is None else mask & valid


@_common.keyword_only
def topk_activation(pre: jax.Array, k: int, *, valid: jax.Array | None = None) -> jax.Array:
  r"""The CSR / TopK-SAE activation: z = ReLU(TopK_k(pre)), row by row.

  The k largest pre-activations of each row are kept (then passed through ReLU), the others set to 0;
  the gradient flows through the kept entries only (the selection is piecewise constant). `valid`
  (a bool array broadcastable to `pre`) restricts the selection to some latents (the dead ones, for the
  auxiliary loss). With k = H it is ReLU.

  >>> import jax.numpy as jnp
  >>> topk_activation(jnp.array([[3.0, -1.0, 2.0, 1.0]]), 2).tolist()
  [[3.0, 0.0, 2.0, 0.0]]
  """
  pre = _checks.check_array("pre", pre, ndim=(1, 2))
  return jnp.where(topk_mask(pre, k, valid=valid), jax.nn.relu(pre), jnp.zeros((), pre.dtype))


@_common.keyword_only
def sae_pre_activation(x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
  r"""Encoder pre-activations (x − b_pre) W_enc + b_enc, float32 (B, H) (float32 accumulation).

  >>> import jax.numpy as jnp
  >>> p = {"encoder": jnp.eye(2), "latent_bias": jnp.zeros(2), "pre_bias": jnp.ones(2)}
  >>> sae_pre_activation(jnp.array([[3.0, 0.0]]), p).tolist()
  [[2.0, -1.0]]
  """
  x = _checks.check_array("x", x, ndim=2)
  w, b_enc, b_pre, _ = _check_params(params, x.shape[1])
  x32 = x.astype(jnp.float32) - b_pre.astype(jnp.float32)
  return jnp.einsum("bd,dh->bh", x32, w.astype(jnp.float32)) + b_enc.astype(jnp.float32)


@_common.keyword_only
def sae_encode(x: jax.Array, params: Mapping[str, jax.Array], *, k: int) -> jax.Array:
  r"""The sparse code z_k(x) = ReLU(TopK_k((x − b_pre) W_enc + b_enc)), float32 (B, H).

  Any k (1..H) can be used at inference: this is CSR's adaptive representation.

  >>> import jax.numpy as jnp
  >>> p = {"encoder": jnp.eye(3), "latent_bias": jnp.zeros(3), "pre_bias": jnp.zeros(3)}
  >>> sae_encode(jnp.array([[0.5, -2.0, 1.0]]), p, k=1).tolist()
  [[0.0, 0.0, 1.0]]
  """
  return topk_activation(sae_pre_activation(x, params), k)


@_common.keyword_only
def sae_decode(codes: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
  r"""The reconstruction x̂ = z W_dec + b_pre, float32 (B, D); W_dec = W_encᵀ when `params` has no
  "decoder" (tied weights, as in the authors' code).

  >>> import jax.numpy as jnp
  >>> p = {"encoder": jnp.eye(2), "latent_bias": jnp.zeros(2), "pre_bias": jnp.ones(2)}
  >>> sae_decode(jnp.array([[2.0, 0.0]]), p).tolist()
  [[3.0, 1.0]]
  """
  codes = _checks.check_array("codes", codes, ndim=2)
  _, _, b_pre, w_dec = _check_params(params)
  if codes.shape[1] != w_dec.shape[0]:
    raise ValueError(f"`codes` must have {w_dec.shape[0]} latents (H), got shape {codes.shape}.")
  return jnp.einsum("bh,hd->bd", codes.astype(jnp.float32), w_dec.astype(jnp.float32)) + b_pre.astype(
      jnp.float32
  )


# ------------------------------------------------------------------------------ the contrastive term
@_common.keyword_only
@_common.shardable("z1", "z2", "mask")
def csr_contrastive(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = CSR_TEMPERATURE,
    form: str = "nt_xent",
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""CSR's contrastive term on sparse codes (the paper's "sparse contrastive" / non-negative CL loss).

  With ẑ = z/‖z‖ (an all-zero code stays 0) and s(a, b) = <ẑ_a, ẑ_b>/τ:

  - form="nt_xent" (the authors' `inbatch_cl`, the default): over the 2B rows u = [z1; z2], each row's
    positive is its other view p(i), the denominator every row but itself,
        L = mean_{i<2B} [ −s(u_i, u_p(i)) + log Σ_{j≠i} exp s(u_i, u_j) ];
  - form="infonce": one direction, L = mean_i [ −s(z1_i, z2_i) + log Σ_j exp s(z1_i, z2_j) ].

  These are `jaxcl.losses.nt_xent` / `infonce` on the codes; the log-sum-exps run on every engine.
  `reduction`: "mean", "sum" or "none": the per-anchor terms in brackets, (2B,) for "nt_xent" (the B
  rows of z1, then the B of z2; this device's under `axis_name`) and (B,) for "infonce". `mask`: None
  or bool (B,); False marks padding pairs, which are neither anchors nor negatives (both of their rows).
  `impl`: similarity engine; "allgather" | "ring" with `axis_name` / `mesh`: the batch split over
  devices (the ring never gathers the codes). `axis_name`, `mesh`: see "Sharded batches" in
  `jaxcl.losses`.

  >>> import jax.numpy as jnp
  >>> z = jnp.eye(2)
  >>> round(float(csr_contrastive(z, z, temperature=1.0)), 4)  # log(e + 2) - 1
  0.5514
  """
  _checks.check_choice("form", form, CONTRASTIVE_FORMS)
  a, b = _common.pair("z1", z1, "z2", z2, normalize=True, axis_name=axis_name)
  inv_t = _common.inverse_temperature(temperature)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, a.shape[0])
  if form == "infonce":
    lse = ops.logsumexp(a, b, scale=inv_t, row_valid=mask, col_valid=mask, impl=impl, axis_name=axis_name).rows
    per_anchor = _common.zero_invalid(lse, mask) - inv_t * _common.rowwise_dot(a, b)
    return _common.reduce_loss(per_anchor, reduction, mask, axis_name)
  u = jnp.concatenate([a, b], axis=0)
  valid = None if mask is None else jnp.concatenate([mask, mask])
  sample_ids = _common.batch_ids(a.shape[0], axis_name)  # view v of global sample i: v·B + i
  ids = jnp.concatenate([sample_ids, sample_ids + _common.global_size(a.shape[0], axis_name)])
  lse = ops.logsumexp(u, u, scale=inv_t, exclude=(ids, ids), row_valid=valid, col_valid=valid, impl=impl,
                      axis_name=axis_name).rows
  partner = jnp.roll(u, u.shape[0] // 2, axis=0)
  per_anchor = _common.zero_invalid(lse, valid) - inv_t * _common.rowwise_dot(u, partner)
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)


# --------------------------------------------------------------------------------------- the objective
def _row_mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """mean_d (a_id − b_id)² per row, (N,)."""
  return jnp.mean(jnp.square(a - b), axis=1)


def _normalized_row_mse(recon: jax.Array, target: jax.Array, valid: jax.Array | None, axis_name=None
                        ) -> jax.Array:
  """mean_d (recon − target)² per row over the batch's mse(mean of target, target), both over the
  `valid` rows (all when None) of the global batch; 0 where the denominator is 0. Their mean over the
  valid rows is mse(recon, target) / mse(batch mean of target, target)."""
  if valid is None:
    n = jnp.float32(_common.global_size(target.shape[0], axis_name))
    centre = _common.batch_sum_rows(target, axis_name)[None, :] / n
    den = _common.batch_sum(jnp.square(centre - target), axis_name) / (n * target.shape[1])
  else:
    kept = jnp.where(valid[:, None], target, 0.0)
    n = jnp.maximum(_common.batch_sum(valid.astype(jnp.float32), axis_name), 1.0)
    centre = _common.batch_sum_rows(kept, axis_name)[None, :] / n
    den = _common.batch_sum(jnp.where(valid[:, None], jnp.square(centre - target), 0.0), axis_name) / (
        n * target.shape[1])
  ok = den > 0
  return jnp.where(ok, _row_mse(recon, target) / jnp.where(ok, den, 1.0), 0.0)


def _csr_out_specs(batch_spec, reduction):
  """The outputs of `csr` over a mesh: the losses like `reduction`, the codes split like the batch,
  the dead-latent counters replicated."""
  r = batch_spec if reduction == "none" else PartitionSpec()
  return CSROutput(loss=r, reconstruction=r, reconstruction_multi_k=r, auxiliary=r, contrastive=r,
                   codes=batch_spec, steps_since_active=PartitionSpec())


@_common.keyword_only
@_common.shardable("x", "positive", "mask", out_specs=_csr_out_specs)
def csr(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    *,
    k: int,
    positive: jax.Array | None = None,
    steps_since_active: jax.Array | None = None,
    dead_threshold: int = CSR_DEAD_THRESHOLD,
    multi_k: int = CSR_MULTI_K,
    multi_k_weight: float = CSR_MULTI_K_WEIGHT,
    aux_k: int = CSR_AUX_K,
    aux_weight: float = CSR_AUX_WEIGHT,
    contrastive_weight: float = CSR_CONTRASTIVE_WEIGHT,
    temperature: float | jax.Array = CSR_TEMPERATURE,
    contrastive_form: str = "nt_xent",
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> CSROutput:
  r"""The CSR objective: TopK sparse-autoencoder reconstruction + contrastive loss on the sparse codes.

  "Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation" (Wen et al., ICML 2025).
  On frozen embeddings x (B, D) and autoencoder parameters (W_enc, b_enc, b_pre, W_dec; see the module
  docstring):

      z_k(x)  = ReLU(TopK_k((x − b_pre) W_enc + b_enc))          x̂_k = z_k W_dec + b_pre
      L(k)    = mean_{i,d} (x_id − x̂_k,id)²
      L_aux   = ‖ê − e‖² / ‖e − ē‖²,   e = x − sg(z_k W_dec),   ê = z_aux W_dec + b_pre
                z_aux = ReLU(TopK_{k_aux} over the dead latents),  ē = batch mean of e
      L_recon = L(k) + w_m · L(m·k) + β · L_aux                  (m = 4, w_m = 1/8, β = 1/32, k_aux = 512)
      L_cl    = contrastive loss on the sparse codes z_k          (`csr_contrastive`, τ = 0.2)
      loss    = L_recon + γ · L_cl                               (γ = 0.1)

  Choices, following the authors' code (github.com/neilwen987/CSR_Adaptive_Rep, `Vision/main_visual.py`
  and `model_zoo.py`) where the paper leaves details open:
  - tied weights by default (W_dec = W_encᵀ; give `params["decoder"]` for an untied decoder); no
    input LayerNorm (their `normalize=False`); "MSE" is the mean over batch and features;
  - L_aux is OpenAI's TopK-SAE auxiliary loss as that code writes it: a normalised MSE whose target is
    the stop-gradient residual, and ê includes b_pre (so b_pre gets a gradient from it even when no latent
    is dead, z_aux = 0); 0 when the residual has no batch variance. m·k and k_aux are capped at H;
  - dead latents: a latent fires in a step when it is in some row's top m·k with a code > 1e-5 (the
    top-k and top-4k passes both count in their code); `steps_since_active` counts the steps since it
    last fired, updated with this batch before L_aux (as their code does), and a latent is dead when the
    count reaches `dead_threshold` (default 10 steps: their 30 forward passes, three per step). Pass
    None at the first step (nothing dead) and the returned `steps_since_active` afterwards;
  - L_cl: the default "nt_xent" is their `inbatch_cl` (normalised codes, τ = 0.2, positives the other
    view, the denominator all other rows). Without `positive`, both views are the codes of x itself
    (their vision recipe runs the same frozen embeddings through the SAE twice); give `positive` (B, D)
    (a second view, the paired document or caption embedded by the same backbone) for real pairs:
    the reconstruction terms then cover all 2B embeddings. "infonce" is the one-direction form
    (text retrieval, `jaxcl.losses.infonce`).

  With contrastive_weight = 0 it is the pure TopK-SAE reconstruction loss; with k = H, identity
  weights and zero biases the codes are ReLU(x) and L_cl is `nt_xent(relu(x), relu(positive), 0.2)`.

  Args:
    x: (B, D) embeddings (any float dtype; the math is float32). B >= 2.
    params: the autoencoder parameters (see the module docstring); `SparseAutoencoder` makes them.
    k: active latents per code, 1 <= k <= H (the paper trains k = 8 ... 256; vision default 8).
    positive: None or (B, D) positive partners of x.
    steps_since_active: None or (H,) integer counters returned by the previous step.
    dead_threshold: steps without firing after which a latent is dead (>= 1).
    multi_k, multi_k_weight: the second reconstruction at min(m·k, H) latents and its weight.
    aux_k, aux_weight: latents (capped at H) and weight β of the dead-latent auxiliary loss.
    contrastive_weight, temperature, contrastive_form: γ, τ and the form of L_cl ("nt_xent" or
      "infonce").
    reduction: "mean", "sum" or "none"; it applies to `loss` and to each of its four parts. "none":
      (B,) per-sample terms whose mean is the default value: for sample i, L(k)_i and L(m·k)_i are
      mean_d of its squared errors (averaged over its two rows x_i and positive_i when `positive` is
      given), L_aux,i its rows' mean_d (ê − e)² over the batch's ‖e − ē‖² term, L_cl,i its
      `csr_contrastive` term (for "nt_xent" the mean of its two anchors, rows i and B + i), and
      loss_i = L(k)_i + w_m·L(m·k)_i + β·L_aux,i + γ·L_cl,i.
    mask: None or bool (B,): False marks padding samples (x_i and positive_i), left out of every term:
      neither anchors nor negatives, outside the batch mean ē and its variance, and never counted as
      firing a latent. Their `codes` rows are computed but meaningless.
    impl: similarity engine for L_cl ("dense", "blockwise", "pallas", "auto"); "allgather" | "ring"
      with `axis_name` / `mesh`: the batch (x, positive, mask) split over devices, the batch mean ē,
      its variance and the firing latents over the global batch (the ring never gathers the codes).
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`; `codes` come back split like the batch,
      `steps_since_active` the same on every device.
  Returns:
    CSROutput(loss, reconstruction, reconstruction_multi_k, auxiliary, contrastive, codes,
    steps_since_active).

  >>> import jax.numpy as jnp
  >>> p = {"encoder": jnp.eye(2), "latent_bias": jnp.zeros(2), "pre_bias": jnp.zeros(2)}
  >>> out = csr(jnp.eye(2), p, k=2)  # codes = ReLU(x) = x: a perfect reconstruction
  >>> float(out.reconstruction), float(out.auxiliary)
  (0.0, 0.0)
  >>> round(float(out.contrastive), 4)  # log(e^5 + 2) - 5, identical views at τ = 0.2
  0.0134
  """
  x = _checks.check_array("x", x, ndim=2)
  _common.check_global_batch("x", x, 2, axis_name, why="the contrastive term needs a negative")
  w, _, _, w_dec = _check_params(params, x.shape[1])
  hidden = w.shape[1]
  k = _check_int("k", k, low=1, high=hidden, why=f"at most the {hidden} latents")
  multi_k = _check_int("multi_k", multi_k, low=1)
  aux_k = _check_int("aux_k", aux_k, low=1)
  dead_threshold = _check_int("dead_threshold", dead_threshold, low=1)
  for name, value in (
      ("multi_k_weight", multi_k_weight), ("aux_weight", aux_weight),
      ("contrastive_weight", contrastive_weight),
  ):
    _checks.check_non_negative(name, value)
  _checks.check_positive("temperature", temperature)
  _checks.check_choice("contrastive_form", contrastive_form, CONTRASTIVE_FORMS)
  _common.check_reduction(reduction)
  b = x.shape[0]
  mask = _common.sample_mask(mask, b)
  if positive is not None:
    positive = _checks.check_array("positive", positive, ndim=2)
    _checks.check_same_shape("x", x, "positive", positive)
    rows = jnp.concatenate([x.astype(jnp.float32), positive.astype(jnp.float32)], axis=0)
  else:
    rows = x.astype(jnp.float32)
  if steps_since_active is None:
    steps = jnp.zeros((hidden,), jnp.int32)
  else:
    steps = jnp.asarray(steps_since_active)
    if steps.shape != (hidden,) or not jnp.issubdtype(steps.dtype, jnp.integer):
      raise ValueError(
          f"`steps_since_active` must be an integer array of shape ({hidden},), got {steps.dtype} "
          f"{steps.shape}."
      )

  row_valid = mask if mask is None or positive is None else jnp.concatenate([mask, mask])  # rows' mask
  per_sample = lambda per_row: per_row if positive is None else 0.5 * (per_row[:b] + per_row[b:])

  pre = sae_pre_activation(rows, params)
  codes_k = topk_activation(pre, k)
  recon_k = sae_decode(codes_k, params)
  loss_k = per_sample(_row_mse(rows, recon_k))
  codes_m = topk_activation(pre, min(multi_k * k, hidden))
  loss_m = per_sample(_row_mse(rows, sae_decode(codes_m, params)))

  firing = jax.lax.stop_gradient(codes_m) > FIRE_EPS
  if row_valid is not None:
    firing = firing & row_valid[:, None]
  fired = _common.batch_sum_rows(firing.astype(jnp.float32), axis_name) > 0
  new_steps = jnp.where(fired, 0, steps.astype(jnp.int32) + 1)
  dead = new_steps >= dead_threshold
  codes_aux = topk_activation(pre, min(aux_k, hidden), valid=dead[None, :])
  residual = rows - jax.lax.stop_gradient(codes_k @ w_dec.astype(jnp.float32))
  loss_aux = per_sample(_normalized_row_mse(sae_decode(codes_aux, params), residual, row_valid, axis_name))

  z1 = codes_k[:b]
  z2 = z1 if positive is None else codes_k[b:]
  loss_cl = csr_contrastive(z1, z2, temperature=temperature, form=contrastive_form, reduction="none",
                            mask=mask, impl=impl, axis_name=axis_name)
  if contrastive_form == "nt_xent":
    loss_cl = 0.5 * (loss_cl[:b] + loss_cl[b:])
  total = loss_k + multi_k_weight * loss_m + aux_weight * loss_aux + contrastive_weight * loss_cl
  reduce = lambda per: _common.reduce_loss(per, reduction, mask, axis_name)
  return CSROutput(
      loss=reduce(total), reconstruction=reduce(loss_k), reconstruction_multi_k=reduce(loss_m),
      auxiliary=reduce(loss_aux), contrastive=reduce(loss_cl), codes=z1, steps_since_active=new_steps,
  )
