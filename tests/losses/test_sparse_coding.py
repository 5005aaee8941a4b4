"""Tests of jaxcl/losses/sparse_coding.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.losses.infonce import infonce, nt_xent
from jaxcl.losses.sparse_coding import (
    csr,
    csr_contrastive,
    sae_decode,
    sae_encode,
    topk_activation,
    topk_mask,
)
from jaxcl.models.sparse_autoencoder import SparseAutoencoder
from tests import helpers
from tests.helpers import randn
from tests.losses import reference
from tests.losses.reference.sparse_coding import ref_csr, ref_parts, ref_topk


assert_value_and_grads = functools.partial(helpers.assert_value_and_grads, jit=True)


# One compile per configuration instead of many eager op compiles (the CI CPU is shared).
jcsr = jax.jit(csr, static_argnames=("k", "multi_k", "aux_k", "dead_threshold", "contrastive_form", "impl"))


def _inputs(seed, b=3, d=4, hidden=10, positive=True, tied=True):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, d)).astype(np.float32)
  pos = (x + 0.5 * rng.standard_normal((b, d))).astype(np.float32) if positive else None
  w = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
  b_enc = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
  b_pre = (0.1 * rng.standard_normal(d)).astype(np.float32)
  w_dec = None if tied else (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)
  return x, pos, w, b_enc, b_pre, w_dec


def _assert_no_ties(x, pos, w, b_enc, b_pre, margin=1e-4):
  """Finite differences are valid only if no perturbation changes a TopK selection or a ReLU."""
  rows = x if pos is None else np.concatenate([x, pos])
  pre = (rows.astype(np.float64) - b_pre) @ w + b_enc
  gaps = np.diff(np.sort(pre, axis=1), axis=1)
  assert gaps.min() > margin and np.abs(pre).min() > margin, "pick another seed: near-tie in the inputs"


def _params(w, b_enc, b_pre, w_dec=None):
  p = {"encoder": w, "latent_bias": b_enc, "pre_bias": b_pre}
  if w_dec is not None:
    p["decoder"] = w_dec
  return p


# ------------------------------------------------------------------------------------------------ TopK
def test_topk_activation_matches_reference_with_and_without_a_valid_mask():
  pre = randn(0, 4, 9)
  valid = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1], bool)
  for k in (1, 3, 9):
    np.testing.assert_array_equal(np.asarray(topk_activation(pre, k)), ref_topk(pre, k).astype(np.float32))
  got = topk_activation(pre, 3, valid=jnp.asarray(valid)[None, :])
  np.testing.assert_array_equal(np.asarray(got), ref_topk(pre, 3, valid).astype(np.float32))
  # Fewer valid entries than k: only the valid ones are kept.
  few = np.zeros(9, bool)
  few[[2, 5]] = True
  assert np.asarray(topk_mask(pre, 4, valid=jnp.asarray(few)[None, :])).sum(axis=1).tolist() == [2] * 4


def test_topk_activation_gradient_flows_through_the_kept_positive_entries_only():
  pre = randn(1, 3, 7)
  c = randn(2, 3, 7)
  g = jax.grad(lambda p: jnp.sum(topk_activation(p, 2) * c))(jnp.asarray(pre))
  kept = ref_topk(pre, 2) > 0
  np.testing.assert_array_equal(np.asarray(g), np.where(kept, c, 0.0))


def test_topk_with_k_equal_to_hidden_is_relu():
  pre = randn(3, 5, 6)
  np.testing.assert_array_equal(np.asarray(topk_activation(pre, 6)), np.maximum(pre, 0))


def test_topk_breaks_ties_towards_the_lower_index():
  assert np.asarray(topk_mask(jnp.array([[1.0, 2.0, 2.0, 2.0]]), 2)).tolist() == [[False, True, True, False]]


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize(
    "seed,positive,tied,form,steps",
    [
        (10, False, True, "nt_xent", None),  # the authors' vision recipe: the same embeddings twice
        (11, True, False, "nt_xent", "dead"),
        (12, True, True, "infonce", "dead"),
    ],
)
def test_csr_matches_reference(seed, positive, tied, form, steps):
  x, pos, w, b_enc, b_pre, w_dec = _inputs(seed, positive=positive, tied=tied, hidden=16)
  _assert_no_ties(x, pos, w, b_enc, b_pre)
  hidden = w.shape[1]
  k, multi_k, aux_k, threshold = 2, 1, 3, 5
  # "dead": latents 0..9 have not fired for 9 steps (dead unless they fire now), the others fired last step.
  steps_np = None if steps is None else np.array([9] * 10 + [0] * (hidden - 10), np.int32)
  opts = dict(k=k, multi_k=multi_k, aux_k=aux_k, tau=0.2, form=form, threshold=threshold, steps=steps_np)
  rows = x if pos is None else np.concatenate([x, pos])
  out_steps = ref_parts(x, pos, w, b_enc, b_pre, w.T if tied else w_dec, **opts)[-1]
  if steps is not None:  # the case must exercise the dead-latent term: some dead latent has a code
    dead = out_steps >= threshold
    assert (((rows - b_pre) @ w + b_enc)[:, dead] > 0).any()

  arrays = [a for a in (x, pos, w, b_enc, b_pre, w_dec) if a is not None]

  def unpack(arrs):
    it = iter(arrs)
    xx = next(it)
    pp = next(it) if positive else None
    ww, be, bp = next(it), next(it), next(it)
    wd = None if tied else next(it)
    return xx, pp, ww, be, bp, wd

  def jax_loss(*arrs):
    xx, pp, ww, be, bp, wd = unpack(arrs)
    return csr(
        xx, _params(ww, be, bp, wd), k=k, positive=pp, multi_k=multi_k, aux_k=aux_k,
        dead_threshold=threshold, contrastive_form=form,
        steps_since_active=None if steps_np is None else jnp.asarray(steps_np),
    ).loss

  # The auxiliary target uses sg(z_k W_dec): hold it at its value at the base point.
  base = [np.asarray(a, np.float64) for a in arrays]
  bx, bp_, bw, bbe, bbp, bwd = unpack(base)
  rows = bx if bp_ is None else np.concatenate([bx, bp_])
  bdec = bw.T if tied else bwd
  detached = ref_topk((rows - bbp) @ bw + bbe, k) @ bdec

  def np_loss(*arrs):
    xx, pp, ww, be, bp, wd = unpack(arrs)
    return ref_csr(xx, pp, ww, be, bp, ww.T if tied else wd, detached=detached, **opts)

  assert_value_and_grads(jax_loss, np_loss, arrays, rtol=2e-5, grad_rtol=2e-4)


def test_csr_parts_and_counters_match_reference_at_the_defaults():
  x, pos, w, b_enc, b_pre, _ = _inputs(20, b=4, d=5, hidden=12)
  steps = np.arange(12, dtype=np.int32) * 3  # latents 4.. have been silent for >= 10 steps
  run = lambda xx, pp, ww, be, bp, st: csr(xx, _params(ww, be, bp), k=3, positive=pp, steps_since_active=st)
  out = jax.jit(run)(x, pos, w, b_enc, b_pre, steps)
  loss_k, loss_m, loss_aux, cl, zk, new_steps = ref_parts(
      *(np.asarray(a, np.float64) for a in (x, pos, w, b_enc, b_pre)), w.T.astype(np.float64), k=3,
      steps=steps,
  )
  for got, want in ((out.reconstruction, loss_k), (out.reconstruction_multi_k, loss_m),
                    (out.auxiliary, loss_aux), (out.contrastive, cl)):
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(float(out.loss), loss_k + loss_m / 8 + loss_aux / 32 + 0.1 * cl, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(out.codes), zk[:4], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.steps_since_active), new_steps)
  assert out.steps_since_active.dtype == jnp.int32


def test_dead_latent_counters_by_hand():
  # Identity encoder, zero biases: codes are ReLU(TopK(x)). With k = 1, m = 1 only each row's largest
  # positive entry fires: latent 0 (row 0) and latent 2 (row 1). Counters [0, 5, 7, 2] → [0, 6, 0, 3];
  # with threshold 6 latent 1 is dead, and it is the only latent L_aux may use (aux_k = 2).
  x = jnp.array([[3.0, 2.0, 0.0, -1.0], [0.0, 0.5, 1.0, 0.2]])
  p = _params(jnp.eye(4), jnp.zeros(4), jnp.zeros(4))
  out = jcsr(x, p, k=1, multi_k=1, aux_k=2, dead_threshold=6, steps_since_active=jnp.array([0, 5, 7, 2]))
  assert out.steps_since_active.tolist() == [0, 6, 0, 3]
  # e = x − z_k: rows [0, 2, 0, −1] and [0, 0.5, 0, 0.2]; z_aux keeps latent 1: ê = [0, 2, 0, 0] and
  # [0, 0.5, 0, 0]; ‖ê − e‖² = 1 + 0.04; batch mean ē = [0, 1.25, 0, −0.4],
  # ‖e − ē‖² = 2·(0.75² + 0.6²).
  want = (1 + 0.04) / (2 * (0.75**2 + 0.6**2))
  np.testing.assert_allclose(float(out.auxiliary), want, rtol=1e-6)


def test_a_latent_that_never_fires_becomes_dead_after_threshold_steps():
  # Latent 3 never wins a top-2 (m = 1): its counter grows by one a step; at 3 it is used by L_aux.
  x = jnp.array([[3.0, 2.0, 0.0, 1.0], [2.0, 3.0, 0.5, 1.5]])
  p = _params(jnp.eye(4), jnp.zeros(4), jnp.zeros(4))
  steps, auxes = None, []
  for _ in range(4):
    out = jcsr(x, p, k=2, multi_k=1, aux_k=1, dead_threshold=3, steps_since_active=steps)
    steps = out.steps_since_active
    auxes.append(float(out.auxiliary))
  assert steps.tolist() == [0, 0, 4, 4]
  # Before a latent is dead z_aux = 0 and ê = b_pre = 0: L_aux = ‖e‖²/‖e − ē‖² (the same each step);
  # afterwards latent 3 (the largest dead one) reconstructs part of the residual and L_aux drops.
  assert auxes[0] == auxes[1] and auxes[2] < auxes[1] and auxes[3] == auxes[2]


# ------------------------------------------------------------------------------------------- identities
def test_with_k_equal_hidden_and_identity_weights_codes_are_relu_and_the_term_is_nt_xent_or_infonce():
  x, pos = randn(30, 6, 5), randn(31, 6, 5)
  p = _params(jnp.eye(5), jnp.zeros(5), jnp.zeros(5))
  np.testing.assert_array_equal(np.asarray(sae_encode(x, p, k=5)), np.maximum(x, 0))

  def run(form):
    return csr(x, p, k=5, positive=pos, contrastive_form=form)

  out = jax.jit(run, static_argnums=0)("nt_xent")
  np.testing.assert_array_equal(np.asarray(out.codes), np.maximum(x, 0))
  want = nt_xent(jnp.maximum(x, 0), jnp.maximum(pos, 0), temperature=0.2)
  np.testing.assert_allclose(float(out.contrastive), float(want), rtol=1e-5)
  got = jax.jit(run, static_argnums=0)("infonce").contrastive
  np.testing.assert_allclose(float(got), float(infonce(jnp.maximum(x, 0), jnp.maximum(pos, 0), temperature=0.2)),
                             rtol=1e-5)
  # Non-negative inputs are reconstructed exactly: L(k) = L(4k) = 0.
  nonneg = jcsr(jnp.abs(x), p, k=5)
  assert float(nonneg.reconstruction) == 0.0 and float(nonneg.reconstruction_multi_k) == 0.0


def test_zero_contrastive_weight_is_the_pure_reconstruction_loss():
  x, pos, w, b_enc, b_pre, _ = _inputs(40, b=4, d=5, hidden=12)
  p = _params(w, b_enc, b_pre)

  def loss(params, temperature, form):
    return jcsr(x, params, k=2, positive=pos, contrastive_weight=0.0, temperature=temperature,
               contrastive_form=form).loss

  a, ga = jax.value_and_grad(loss)(p, 0.2, "nt_xent")  # (jcsr inside: one compile per form)
  b, gb = jax.value_and_grad(loss)(p, 0.05, "infonce")
  f64 = [np.asarray(v, np.float64) for v in (x, pos, w, b_enc, b_pre)]
  want = ref_csr(*f64, f64[2].T, k=2, gamma=0.0)
  np.testing.assert_allclose(float(a), want, rtol=2e-5)
  assert float(a) == float(b)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), ga, gb)


def test_an_untied_decoder_equal_to_the_encoder_transpose_is_the_tied_loss():
  x, pos, w, b_enc, b_pre, _ = _inputs(50, b=4, d=5, hidden=12)
  tied = jcsr(x, _params(w, b_enc, b_pre), k=3, positive=pos).loss
  untied = jcsr(x, _params(w, b_enc, b_pre, w.T.copy()), k=3, positive=pos).loss
  np.testing.assert_allclose(float(untied), float(tied), rtol=1e-6)


def test_module_codes_are_sae_encode_and_the_loss_trains_its_parameters():
  x = randn(60, 8, 6)
  for tied in (True, False):
    sae = SparseAutoencoder(hidden=24, k=4, tied=tied)
    variables = sae.init(jax.random.key(0), x)
    params = variables["params"]
    assert ("decoder" in params) == (not tied)
    np.testing.assert_array_equal(np.asarray(sae.apply(variables, x)), np.asarray(sae_encode(x, params, k=4)))
    np.testing.assert_array_equal(np.asarray(sae.apply(variables, x, k=7)), np.asarray(sae_encode(x, params, k=7)))
  grads = jax.jit(jax.grad(lambda pr: csr(x, pr, k=4).loss))(params)  # untied: every parameter trains
  assert set(grads) == set(params)
  assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in grads.values())
  # decode(encode(x)) is the reconstruction L(k) measures.
  recon = sae_decode(sae_encode(x, params, k=4), params)
  np.testing.assert_allclose(float(jcsr(x, params, k=4).reconstruction), float(jnp.mean((x - recon) ** 2)),
                             rtol=1e-6)


# -------------------------------------------------------------------------------------------- engines
@pytest.mark.parametrize("form", ["nt_xent", "infonce"])
def test_contrastive_term_agrees_on_every_engine(form):
  # Sparse non-negative codes, one of them all zero (it stays 0 after normalisation: no NaN).
  z1 = np.maximum(randn(80, 5, 12), 0) * (randn(81, 5, 12) > 0.5)
  z1[2] = 0.0
  z2 = np.maximum(randn(82, 5, 12), 0)
  want = reference.infonce.nt_xent(z1, z2, 0.2) if form == "nt_xent" else reference.infonce.infonce(z1, z2, 0.2)
  grads = {}
  for impl in helpers.engines():
    f = lambda a, b, impl=impl: csr_contrastive(a, b, form=form, impl=impl)
    got, grads[impl] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z1, z2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=impl)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads[impl]), impl
  for impl in helpers.engines():
    for got_g, want_g in zip(grads[impl], grads["dense"]):
      np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-4, atol=1e-6, err_msg=impl)


def test_csr_passes_impl_to_the_contrastive_term():
  x, pos, w, b_enc, b_pre, _ = _inputs(70, b=6, d=5, hidden=16)
  p = _params(w, b_enc, b_pre)
  f = lambda impl: jax.jit(jax.value_and_grad(lambda params: csr(x, params, k=3, positive=pos, impl=impl).loss))(p)
  (want, want_g), (got, got_g) = f("dense"), f("pallas")
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               got_g, want_g)


# ----------------------------------------------------------------------------------------------- bf16
def test_bf16_inputs_give_the_float32_loss_of_the_rounded_inputs():
  x, pos, w, b_enc, b_pre, _ = _inputs(90, b=8, d=6, hidden=24)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  p16 = _params(bf(w), bf(b_enc), bf(b_pre))
  f = jax.jit(lambda xx, pp, params: csr(xx, params, k=4, positive=pp))
  out16 = f(bf(x), bf(pos), p16)
  out32 = f(*(jax.tree.map(lambda a: a.astype(jnp.float32), t) for t in (bf(x), bf(pos), p16)))
  assert out16.loss.dtype == jnp.float32 and out16.codes.dtype == jnp.float32
  np.testing.assert_allclose(float(out16.loss), float(out32.loss), rtol=1e-5)
  grads = jax.jit(jax.grad(lambda params: csr(bf(x), params, k=4, positive=bf(pos)).loss))(p16)
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all() for g in grads.values())


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_errors_that_name_the_argument():
  x, pos, w, b_enc, b_pre, _ = _inputs(100, b=4, d=5, hidden=8)
  p = _params(w, b_enc, b_pre)
  with pytest.raises(ValueError, match=r"`k` must be in \[1, 8\].*got 9"):
    csr(x, p, k=9)
  with pytest.raises(ValueError, match=r"`k` must be in \[1, 8\].*got 0"):
    csr(x, p, k=0)
  with pytest.raises(ValueError, match="`k`"):
    sae_encode(x, p, k=9)
  with pytest.raises(TypeError, match="`k` must be a Python int"):
    csr(x, p, k=2.0)
  with pytest.raises(ValueError, match="missing"):
    csr(x, {"encoder": w, "latent_bias": b_enc}, k=2)
  with pytest.raises(ValueError, match=r"params\['encoder'\].*\(6, H\)"):
    csr(randn(1, 4, 6), p, k=2)
  with pytest.raises(ValueError, match=r"params\['latent_bias'\]"):
    csr(x, _params(w, b_enc[:3], b_pre), k=2)
  with pytest.raises(ValueError, match=r"params\['decoder'\].*\(8, 5\)"):
    csr(x, _params(w, b_enc, b_pre, w), k=2)
  with pytest.raises(ValueError, match="`x` and `positive`"):
    csr(x, p, k=2, positive=pos[:3])
  with pytest.raises(ValueError, match="`x` needs at least 2"):
    csr(x[:1], p, k=2)
  with pytest.raises(ValueError, match="`temperature` must be positive"):
    csr(x, p, k=2, temperature=0.0)
  with pytest.raises(ValueError, match="`aux_weight` must be >= 0"):
    csr(x, p, k=2, aux_weight=-1.0)
  with pytest.raises(ValueError, match="`multi_k` must be >= 1"):
    csr(x, p, k=2, multi_k=0)
  with pytest.raises(ValueError, match="`steps_since_active`.*\\(8,\\)"):
    csr(x, p, k=2, steps_since_active=jnp.zeros(7, jnp.int32))
  with pytest.raises(ValueError, match="`contrastive_form`"):
    csr(x, p, k=2, contrastive_form="clip")
  with pytest.raises(ValueError, match="`x` must have rank 2"):
    csr(x[0], p, k=2)


# ---------------------------------------------------------------------------------- reduction and mask
_PARTS = ("loss", "reconstruction", "reconstruction_multi_k", "auxiliary", "contrastive")


@pytest.mark.parametrize("positive,form", [(True, "nt_xent"), (True, "infonce"), (False, "nt_xent")])
def test_csr_padded_batch_with_mask_equals_unpadded_batch(positive, form):
  x, pos, w, b_enc, b_pre, _ = _inputs(110, b=5, d=4, hidden=12, positive=positive)
  p = _params(w, b_enc, b_pre)
  steps = np.array([9, 0, 9, 3, 9, 9, 0, 9, 9, 2, 9, 9], np.int32)  # many latents one step from dead
  kw = dict(k=2, multi_k=2, aux_k=3, steps_since_active=steps, contrastive_form=form, contrastive_weight=0.5)
  arrays = [x] if pos is None else [x, pos]
  run = lambda params, *xs, **m: csr(xs[0], params, positive=None if pos is None else xs[1], **kw, **m)
  helpers.assert_padded_equals_unpadded(lambda *xs, **m: run(p, *xs, **m).loss, arrays, rtol=2e-6)
  # every part, the counters and the parameters' gradients equal the unpadded batch's
  padded, mask = helpers.pad_batch(0, arrays, 3)
  want, want_g = jax.jit(lambda pp: (run(pp, *arrays), jax.grad(lambda q: run(q, *arrays).loss)(pp)))(p)
  got, got_g = jax.jit(lambda pp: (run(pp, *padded, mask=jnp.asarray(mask)),
                                   jax.grad(lambda q: run(q, *padded, mask=jnp.asarray(mask)).loss)(pp)))(p)
  assert float(want.auxiliary) > 0  # some latents are dead: the auxiliary term is exercised
  for name in _PARTS:
    np.testing.assert_allclose(float(getattr(got, name)), float(getattr(want, name)), rtol=2e-6, atol=1e-7,
                               err_msg=name)
  np.testing.assert_array_equal(np.asarray(got.steps_since_active), np.asarray(want.steps_since_active))
  np.testing.assert_allclose(np.asarray(got.codes)[mask], np.asarray(want.codes), rtol=1e-6)
  for name in want_g:
    np.testing.assert_allclose(np.asarray(got_g[name]), np.asarray(want_g[name]), rtol=1e-5, atol=1e-7,
                               err_msg=name)


@pytest.mark.parametrize("positive,form", [(True, "nt_xent"), (True, "infonce"), (False, "nt_xent")])
def test_csr_reduction_none_and_sum_for_every_part(positive, form):
  x, pos, w, b_enc, b_pre, _ = _inputs(111, b=5, d=4, hidden=12, positive=positive)
  p = _params(w, b_enc, b_pre)
  steps = np.full(12, 9, np.int32)
  arrays = [x] if pos is None else [x, pos]
  for name in _PARTS:
    loss = lambda *xs, **kw: getattr(csr(xs[0], p, k=2, multi_k=2, aux_k=3, steps_since_active=steps,
                                         positive=None if pos is None else xs[1], contrastive_form=form, **kw), name)
    helpers.assert_reductions_agree(loss, arrays, 5)
    helpers.assert_reductions_agree(loss, arrays, 5, mask=np.array([1, 1, 0, 1, 1], bool))


def test_csr_per_sample_terms_match_reference():
  x, pos, w, b_enc, b_pre, _ = _inputs(112, b=4, d=4, hidden=10)
  p = _params(w, b_enc, b_pre)
  out = csr(x, p, k=3, positive=pos, reduction="none")
  for i in range(4):  # a sample's reconstruction terms do not depend on the rest of the batch
    one = csr(np.stack([x[i], x[i]]), p, k=3, positive=np.stack([pos[i], pos[i]]))
    np.testing.assert_allclose(float(out.reconstruction[i]), float(one.reconstruction), rtol=1e-5)
    np.testing.assert_allclose(float(out.reconstruction_multi_k[i]), float(one.reconstruction_multi_k), rtol=1e-5)
  z1, z2 = out.codes, sae_encode(pos, p, k=3)
  per_anchor = np.asarray(csr_contrastive(z1, z2, reduction="none"), np.float64)
  np.testing.assert_allclose(np.asarray(out.contrastive), 0.5 * (per_anchor[:4] + per_anchor[4:]), rtol=1e-5)
  total = out.reconstruction + out.reconstruction_multi_k / 8 + out.auxiliary / 32 + 0.1 * out.contrastive
  np.testing.assert_allclose(np.asarray(out.loss), np.asarray(total), rtol=1e-6)


@pytest.mark.parametrize("form", ["nt_xent", "infonce"])
def test_contrastive_term_padded_batch_with_mask_equals_unpadded_batch(form, monkeypatch):
  from jaxcl.ops import blockwise  # noqa: PLC0415

  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 4)
  z1 = np.maximum(randn(113, 5, 6), 0)
  z2 = np.maximum(randn(114, 5, 6), 0)
  anchors = 10 if form == "nt_xent" else 5
  for impl in helpers.engines():
    loss = lambda a, b, **kw: csr_contrastive(a, b, form=form, temperature=0.3, impl=impl, **kw)
    helpers.assert_padded_equals_unpadded(loss, [z1, z2], rtol=2e-6)
    helpers.assert_reductions_agree(loss, [z1, z2], anchors)
    helpers.assert_reductions_agree(loss, [z1, z2], anchors, mask=np.array([1, 0, 1, 1, 1], bool))
  want = reference.infonce.nt_xent(z1, z2, 0.3) if form == "nt_xent" else reference.infonce.infonce(z1, z2, 0.3)
  np.testing.assert_allclose(float(csr_contrastive(z1, z2, form=form, temperature=0.3)), want, rtol=1e-5)


def test_bad_reduction_or_mask_are_errors_that_name_the_argument():
  x, pos, w, b_enc, b_pre, _ = _inputs(115, b=4, d=5, hidden=8)
  p = _params(w, b_enc, b_pre)
  with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\)"):
    csr(x, p, k=2, mask=np.ones(8, bool))
  with pytest.raises(TypeError, match=r"`mask` must be a boolean array"):
    csr(x, p, k=2, positive=pos, mask=np.ones(4, np.int32))
  with pytest.raises(ValueError, match=r"`reduction` must be one of"):
    csr(x, p, k=2, reduction="avg")
  with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\)"):
    csr_contrastive(x, pos, mask=np.ones(3, bool))
  with pytest.raises(ValueError, match=r"`reduction` must be one of"):
    csr_contrastive(x, pos, reduction="avg")


SHARDED = [("ring", 3), ("allgather", 8)]


@pytest.mark.parametrize("impl,n_devices", SHARDED)
def test_csr_sharded_equals_dense(impl, n_devices):
  """The batch split over 3 (ring) and 8 (allgather) devices, with dead latents (and padding samples on
  8): the dense objective and its gradients in the embeddings and the autoencoder's parameters; on 3
  devices also csr_contrastive's "infonce" form, on 8 the codes and the counters."""
  x, positive = randn(0, 24, 8), randn(1, 24, 8)
  w, b_enc, b_pre = 0.5 * randn(2, 8, 12), 0.1 * randn(3, 12), 0.1 * randn(4, 8)
  mask = jnp.arange(24) % 5 != 3
  steps = jnp.arange(12, dtype=jnp.int32) % 7  # latents at 5 and 6 steps are dead unless they fire
  opts = dict(k=3, multi_k=2, aux_k=4, aux_weight=0.5, contrastive_weight=0.5, steps_since_active=steps,
              dead_threshold=5, mask=None if impl == "ring" else mask)

  def loss(x, positive, w, b_enc, b_pre, **kw):
    params = {"encoder": w, "latent_bias": b_enc, "pre_bias": b_pre}
    return csr(x, params, positive=positive, **opts, **kw).loss

  helpers.assert_sharded_equals_dense(loss, [x, positive, w, b_enc, b_pre], impl=impl, n_devices=n_devices)
  if impl == "ring":
    infonce_form = lambda a, b, **kw: csr_contrastive(a, b, form="infonce", mask=mask, **kw)  # noqa: E731
    helpers.assert_sharded_equals_dense(infonce_form, [x, positive], impl=impl, n_devices=n_devices)
    return  # the codes and counters do not depend on the engine: checked on 8 devices
  params = {"encoder": jnp.asarray(w), "latent_bias": jnp.asarray(b_enc), "pre_bias": jnp.asarray(b_pre)}
  mesh = helpers.device_mesh(n_devices)
  got = jax.jit(lambda a, p: csr(a, params, positive=p, impl=impl, mesh=mesh, reduction="none", **opts))(
      x, positive)
  want = csr(x, params, positive=positive, impl="dense", reduction="none", **opts)
  np.testing.assert_array_equal(got.steps_since_active, want.steps_since_active)
  np.testing.assert_allclose(got.codes, want.codes, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.auxiliary, want.auxiliary, rtol=1e-5, atol=1e-6)
