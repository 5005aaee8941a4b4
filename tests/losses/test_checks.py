"""The input checks of the losses (jaxcl/_checks.py and the helpers of jaxcl/losses/_common.py): integer
labels that int32 cannot hold, temperatures and logit scales against what float32 holds, scalar
parameters of shape (1,) and bfloat16, empty feature axes and empty negatives, positional misuse."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl.losses as L
from tests.helpers import randn

B, D = 8, 16
A, P = (jnp.asarray(randn(seed, B, D)) for seed in (700, 701))
VIEWS = jnp.asarray(randn(702, 3, B, D))
LABELS = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32)


# ----------------------------------------------------------------------------- labels beyond int32
BIG = 2**32  # 5 + 2**32 wraps to 5 in int32


def _with_labels(labels):
  """Each loss that takes integer labels or ids, called with `labels` in that argument."""
  feats = jnp.stack([A, P], axis=1)
  ids = np.arange(B)
  return {
      "labels": [
          lambda: L.supcon(feats, labels),
          lambda: L.batch_hard_triplet(A, labels),
          lambda: L.focal_supcon(feats, labels),
          lambda: L.sbcl(feats, labels, ids),
          lambda: L.spherical_z_loss(A[:, :4], labels % 4 if labels.max() < 4 else labels, a=1.0, b=0.0),
          lambda: L.subclass_kmeans(A, labels, subclass_size=2),
          lambda: L.unpg(A, labels, VIEWS[0]),
      ],
      "query_labels": [
          lambda: L.gated_pair_infonce(A, P, jnp.ones((D,)), query_labels=labels, pair_labels=labels),
      ],
      "subclass_labels": [lambda: L.sbcl(feats, np.zeros(B, np.int64), labels)],
      "cluster_ids": [lambda: L.mcl_nt_xent(A, P, labels),
                      lambda: L.pamc(A, np.array([[0], [1]]), labels, num_clusters=8)],
      "group_ids": [lambda: L.grouped_itc(A, P, labels, logit_scale=1.0)],
      "stage_cluster_ids": [lambda: L.mcl_cluster_ids(labels[None])],
      "mix_index": [lambda: L.m3co(A, P, mix_index=labels, mix_weight=0.5)],
      "positives[0]": [lambda: L.decoupled_softmax(A, P, positives=(labels, labels))],
      "ids": [lambda: L.isogclr(A, P, labels, L.isogclr_state(64)),
              lambda: L.isogclr_clip(A, P, labels, L.isogclr_clip_state(64))],
      "positives": [lambda: L.mlcd(A, P, labels[:, None])],
  }


LABEL_CASES = [(arg, i) for arg, calls in _with_labels(np.arange(B)).items() for i in range(len(calls))]


@pytest.mark.parametrize("arg,i", LABEL_CASES)
def test_labels_beyond_int32_are_refused_naming_the_argument(arg, i):
  # 5 + 2**32 and 5 are different labels, equal after the int32 wrap-around of jnp.asarray
  labels = np.array([5, 5 + BIG, 7, 7 + BIG, 1, 2, 3, 4], np.int64)
  if arg == "positives":  # centre ids of mlcd must be < B: only the wrapped value would be in range
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 5 + BIG], np.int64)
  with pytest.raises(ValueError, match=re.escape(f"`{arg}` must fit in int32") + ".*got the value 4294967301"):
    _with_labels(labels)[arg][i]()


def test_labels_beyond_int32_given_as_a_list_are_refused():
  feats = jnp.stack([A, P], axis=1)
  with pytest.raises(ValueError, match=r"`labels` must fit in int32.*4294967301"):
    L.supcon(feats, [5, 5 + BIG, 7, 7 + BIG, 1, 2, 3, 4])
  with pytest.raises(ValueError, match=r"`labels` must fit in int32.*-2147483649"):
    L.batch_hard_triplet(A, [0, 0, 1, 1, 2, 2, 3, -(2**31) - 1])


def test_labels_beyond_int32_are_refused_on_the_mesh_path():
  """On global arrays with a mesh, `shardable` turns the labels into a jax array before the loss checks
  them: the check must come first there too (float embeddings are not copied to the host for it)."""
  feats = np.asarray(jnp.stack([A, P], axis=1))
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  with pytest.raises(ValueError, match=r"`labels` must fit in int32.*4294967301"):
    L.supcon(feats, np.array([5, 5 + BIG, 7, 7 + BIG, 1, 2, 3, 4]), impl="ring", mesh=mesh)


def test_int64_labels_within_int32_give_the_int32_value():
  feats = jnp.stack([A, P], axis=1)
  want = float(L.supcon(feats, LABELS))
  got = float(L.supcon(feats, np.asarray(LABELS, np.int64) + (2**31 - 10)))  # largest labels that fit
  np.testing.assert_allclose(got, want, rtol=1e-6)
  traced = jax.jit(lambda y: L.supcon(feats, y))(LABELS)  # traced labels are not inspected
  np.testing.assert_allclose(float(traced), want, rtol=1e-6)


# ----------------------------------------------------------- temperatures and scales against float32
MAX_SCALE = 2.0**100
TEMPERATURE_LOSSES = {
    "albef_itc": lambda a, p, t: L.albef_itc(a, p, a, p, temperature=t),
    "csr_contrastive": lambda a, p, t: L.csr_contrastive(a, p, temperature=t),
    "cwcl": lambda a, p, t: L.cwcl(a, p, temperature=t),
    "dcl": lambda a, p, t: L.dcl(a, p, temperature=t),
    "dclw": lambda a, p, t: L.dclw(a, p, temperature=t),
    "decoupled_softmax": lambda a, p, t: L.decoupled_softmax(a, p, temperature=t),
    "dual_view_moco": lambda a, p, t: L.dual_view_moco(a, p, VIEWS[0], temperature=t),
    "focal_supcon": lambda a, p, t: L.focal_supcon(jnp.stack([a, p], 1), LABELS, temperature=t),
    "gated_pair_infonce": lambda a, p, t: L.gated_pair_infonce(a, p, jnp.ones((D,)), temperature=t),
    "gram": lambda a, p, t: L.gram(a, p, temperature=t),
    "hn_nce": lambda a, p, t: L.hn_nce(a, p, temperature=t),
    "infonce": lambda a, p, t: L.infonce(a, p, temperature=t, negatives=VIEWS[0]),
    "macl": lambda a, p, t: L.macl(a, p, temperature=t),
    "macl_aligned": lambda a, p, t: L.macl(a, a + 0.01 * p, temperature=t),  # P_i rounds to 1: V overflowed
    "m3co": lambda a, p, t: L.m3co(a, p, mix_index=jnp.roll(jnp.arange(B), 1), mix_weight=0.3, temperature=t),
    "mcl_nt_xent": lambda a, p, t: L.mcl_nt_xent(a, p, LABELS, temperature=t),
    "multiview_infonce": lambda a, p, t: L.multiview_infonce(jnp.stack([a, p, VIEWS[0]]), temperature=t),
    "mv_dhel": lambda a, p, t: L.mv_dhel(jnp.stack([a, p, VIEWS[0]]), temperature=t),
    "nnclr": lambda a, p, t: L.nnclr(a, p, VIEWS[0], temperature=t),
    "nt_xent": lambda a, p, t: L.nt_xent(a, p, temperature=t),
    "cpc": lambda a, p, t: L.cpc(a.reshape(1, 2, 4, D), p.reshape(2, 4, D), temperature=t),  # raw scores
    "patch_nce": lambda a, p, t: L.patch_nce(a.reshape(2, 4, D), p.reshape(2, 4, D), temperature=t, detach_key=False),
    "poly_view": lambda a, p, t: L.poly_view(jnp.stack([a, p, VIEWS[0]]), temperature=t),
    "positive_aware_infonce": lambda a, p, t: L.positive_aware_infonce(a, p, temperature=t),
    "sbcl": lambda a, p, t: L.sbcl(jnp.stack([a, p], 1), LABELS, jnp.arange(B), temperature=t),
    "similarity_distillation": lambda a, p, t: L.similarity_distillation(a, p, temperature=t),
    "softclip": lambda a, p, t: L.softclip(a, p, a, p, temperature=t),
    "supcon": lambda a, p, t: L.supcon(jnp.stack([a, p], 1), LABELS, temperature=t),
    "swav": lambda a, p, t: L.swav(jnp.stack([a, p], 1) @ VIEWS[0].T, temperature=t),  # (B, 2, K) scores
    "simcse": lambda a, p, t: L.simcse(a, p, VIEWS[0], temperature=t),
    "diffcse": lambda a, p, t: L.diffcse(a, p, VIEWS[0], VIEWS[1] > 0, temperature=t),  # (B, D) token logits
    "micse": lambda a, p, t: L.micse(a, p, jax.nn.softmax(VIEWS[0]), jax.nn.softmax(VIEWS[1]), temperature=t),
    "mcse": lambda a, p, t: L.mcse(a, p, a, p, VIEWS[0], temperature=t),
    "quick_thoughts": lambda a, p, t: L.quick_thoughts(a, p, temperature=t),  # raw dot products
}
SCALE_LOSSES = {
    "ce_clip": lambda a, p, s: jax.tree.leaves(L.ce_clip(a, p, VIEWS[:2].transpose(1, 0, 2), logit_scale=s))[0],
    "clip": lambda a, p, s: L.clip(a, p, logit_scale=s),
    "contrastive_gap": lambda a, p, s: L.contrastive_gap(a, p, logit_scale=s),
    "focal_clip": lambda a, p, s: L.focal_clip(a, p, logit_scale=s),
    "focal_clip_gamma_half": lambda a, p, s: L.focal_clip(a, p, logit_scale=s, gamma=0.5),
    "grouped_itc": lambda a, p, s: L.grouped_itc(a, p, LABELS, logit_scale=s),
    "filip": lambda a, p, s: L.filip(jnp.stack([a, p], 1), jnp.stack([p, a], 1), logit_scale=s),
    "meru": lambda a, p, s: L.meru(a, p, logit_scale=s),
    "one_to_k_clip": lambda a, p, s: L.one_to_k_clip(a, jnp.stack([p, VIEWS[0]]), logit_scale=s),
    "siglip": lambda a, p, s: L.siglip(a, p, logit_scale=s, logit_bias=-1.0),
    "symile": lambda a, p, s: L.symile(a, p, VIEWS[0], logit_scale=s),
}
def _value_and_grads(call, value):
  """call(A, P, value) and its gradients with respect to A and P."""
  return jax.value_and_grad(lambda a, p: call(a, p, value), argnums=(0, 1))(A, P)


@pytest.mark.parametrize("name", sorted(TEMPERATURE_LOSSES))
def test_temperature_bound_is_what_float32_holds(name):
  """The smallest accepted temperature, 2^-100, gives a finite loss and finite gradients; the next
  float32 below it is refused, naming the argument (1e-39 used to pass and give NaN)."""
  call = TEMPERATURE_LOSSES[name]
  value, grads = _value_and_grads(call, 1.0 / MAX_SCALE)
  assert np.isfinite(float(value)), name
  assert all(np.all(np.isfinite(g)) for g in grads), name
  below = float(np.nextafter(np.float32(1.0 / MAX_SCALE), np.float32(0)))
  for bad in (below, 1e-39):
    with pytest.raises(ValueError, match=r"`temperature` must be"):
      call(A, P, bad)


@pytest.mark.parametrize("name", sorted(SCALE_LOSSES))
def test_logit_scale_bound_is_what_float32_holds(name):
  """The largest accepted logit scale, 2^100, gives a finite loss and finite gradients; the next float32
  above it is refused, naming the argument (1e39 used to pass and give NaN)."""
  call = SCALE_LOSSES[name]
  value, grads = _value_and_grads(call, MAX_SCALE)
  assert np.isfinite(float(value)), name
  assert all(np.all(np.isfinite(g)) for g in grads), name
  above = float(np.nextafter(np.float32(MAX_SCALE), np.float32(np.inf)))
  for bad in (above, 1e39):
    with pytest.raises(ValueError, match=r"`logit_scale` must be"):
      call(A, P, bad)


def test_every_loss_with_a_temperature_or_logit_scale_is_in_the_bound_tests():
  # layer_kl, matryoshka_2d, starbucks: a temperature of raw (not unit) vectors; csr: its temperature goes
  # to csr_contrastive; gram_negatives: integer draws, nothing to differentiate (tested in test_geometric.py)
  others = {"layer_kl", "matryoshka_2d", "starbucks", "csr", "gram_negatives"}
  covered = set(TEMPERATURE_LOSSES) | set(SCALE_LOSSES) | others
  takes = {n for n in L.__all__ if inspect.isfunction(getattr(L, n))
           and {"temperature", "logit_scale"} & set(inspect.signature(getattr(L, n)).parameters)}
  assert takes <= covered, sorted(takes - covered)


def test_logit_bias_bound():
  value, grads = _value_and_grads(lambda a, p, b: L.siglip(a, p, logit_scale=MAX_SCALE, logit_bias=b), -MAX_SCALE)
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
  for bad in (float(np.nextafter(np.float32(-MAX_SCALE), np.float32(-np.inf))), 1e39, -np.inf):
    with pytest.raises(ValueError, match=r"`logit_bias` must be"):
      L.siglip(A, P, logit_scale=10.0, logit_bias=bad)


@pytest.mark.parametrize("call,arg", [
    (lambda v: L.dclw(A, P, sigma=v), "sigma"),
    (lambda v: L.uniformity(A, t=v), "t"),
    (lambda v: L.alignment(A, P, alpha=v), "alpha"),
])
def test_positive_parameters_must_be_float32_normal_numbers(call, arg):
  call(float(np.finfo(np.float32).tiny))  # the smallest normal float32 is accepted
  for bad in (1e-39, 1e39):  # a float32 subnormal (flushed to 0 by XLA), beyond float32's maximum
    with pytest.raises(ValueError, match=rf"`{arg}` must be a positive float32 number"):
      call(bad)


# ------------------------------------------------------ scalar parameters: shape (1,), bfloat16, shape
def test_shape_1_logit_scale_and_bias_as_in_big_vision():
  want = float(L.siglip(A, P, logit_scale=10.0, logit_bias=-10.0))
  got = L.siglip(A, P, logit_scale=jnp.full((1,), 10.0), logit_bias=jnp.full((1,), -10.0))
  assert got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(float(L.clip(A, P, logit_scale=np.full((1,), 10.0))),
                             float(L.clip(A, P, logit_scale=10.0)), rtol=1e-6)
  np.testing.assert_allclose(float(L.nt_xent(A, P, temperature=jnp.full((1,), 0.2))),
                             float(L.nt_xent(A, P, temperature=0.2)), rtol=1e-6)
  # traced (1,) parameters, with gradients of the same shape
  g = jax.grad(lambda s, b: L.siglip(A, P, logit_scale=s, logit_bias=b), argnums=(0, 1))(
      jnp.full((1,), 10.0), jnp.full((1,), -10.0))
  assert g[0].shape == (1,) and g[1].shape == (1,) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted({**TEMPERATURE_LOSSES, **SCALE_LOSSES}))
def test_every_temperature_and_logit_scale_takes_shape_1(name):
  call = {**TEMPERATURE_LOSSES, **SCALE_LOSSES}[name]
  value = 5.0 if name in SCALE_LOSSES else 0.2
  want = jax.tree.leaves(call(A, P, value))[0]
  got = jax.tree.leaves(call(A, P, jnp.full((1,), value)))[0]
  assert got.shape == want.shape == ()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_supcon_base_temperature_takes_shape_1():
  feats = jnp.stack([A, P], 1)
  want = L.supcon(feats, LABELS, temperature=0.1, base_temperature=0.07)
  got = L.supcon(feats, LABELS, temperature=jnp.full((1,), 0.1), base_temperature=jnp.full((1,), 0.07))
  assert got.shape == ()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_bfloat16_scalars_are_accepted_outside_jit():
  scale = jnp.asarray(10.0, jnp.bfloat16)
  np.testing.assert_allclose(float(L.clip(A, P, logit_scale=scale)), float(L.clip(A, P, logit_scale=10.0)),
                             rtol=1e-6)
  got = L.siglip(A, P, logit_scale=scale, logit_bias=jnp.asarray(-10.0, jnp.bfloat16))
  np.testing.assert_allclose(float(got), float(L.siglip(A, P, logit_scale=10.0, logit_bias=-10.0)), rtol=1e-6)
  t = jnp.asarray(0.25, jnp.bfloat16)  # exactly representable
  np.testing.assert_allclose(float(L.nt_xent(A, P, temperature=t)), float(L.nt_xent(A, P, temperature=0.25)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"`logit_scale` must be positive"):
    L.clip(A, P, logit_scale=jnp.asarray(-1.0, jnp.bfloat16))


@pytest.mark.parametrize("call,arg", [
    (lambda v: L.nt_xent(A, P, temperature=v), "temperature"),
    (lambda v: L.infonce(A, P, temperature=v), "temperature"),
    (lambda v: L.supcon(jnp.stack([A, P], 1), LABELS, temperature=v), "temperature"),
    (lambda v: L.clip(A, P, logit_scale=v), "logit_scale"),
    (lambda v: L.siglip(A, P, logit_scale=v, logit_bias=0.0), "logit_scale"),
    (lambda v: L.siglip(A, P, logit_scale=1.0, logit_bias=v), "logit_bias"),
    (lambda v: L.multiview_infonce(VIEWS, temperature=v), "temperature"),
])
@pytest.mark.parametrize("shape", [(3,), (B,), (1, 1)])
def test_wrongly_shaped_temperatures_name_the_argument(call, arg, shape):
  with pytest.raises(ValueError, match=rf"`{arg}` must be a scalar \(shape \(\) or \(1,\)\), got shape"):
    call(jnp.full(shape, 0.5))
  with pytest.raises(ValueError, match=rf"`{arg}` must be a scalar"):  # traced: the shape is still static
    jax.jit(call)(jnp.full(shape, 0.5))


# ------------------------------------------------------------------------------ empty axes
@pytest.mark.parametrize("call,arg", [
    (lambda x: L.clip(x, x, logit_scale=10.0), "image"),
    (lambda x: L.siglip(x, x, logit_scale=10.0, logit_bias=-10.0), "image"),
    (lambda x: L.infonce(x, x), "query"),
    (lambda x: L.nt_xent(x, x), "z1"),
    (lambda x: L.dcl(x, x), "z1"),
    (lambda x: L.supcon(x, LABELS), "features"),
    (lambda x: L.batch_hard_triplet(x, LABELS), "embeddings"),
    (lambda x: L.triplet(x, x, x), "anchor"),
    (lambda x: L.multiview_infonce(jnp.stack([x, x])), "views"),
    (lambda x: L.barlow_twins(x, x), "z1"),
    (lambda x: L.l2_normalize(x), None),
])
def test_empty_feature_axis_names_the_argument(call, arg):
  x = jnp.zeros((B, 0))
  if arg is None:  # l2_normalize of an empty row is the empty row
    assert call(x).shape == (B, 0)
    return
  with pytest.raises(ValueError, match=rf"`{arg}` must have a non-empty feature \(last\) axis, got shape"):
    call(x)


@pytest.mark.parametrize("call,match", [
    (lambda: L.infonce(A, P, negatives=jnp.zeros((0, D)), in_batch_negatives=False),
     r"`in_batch_negatives=False` needs `negatives` .* got shape \(0, 16\)"),
    (lambda: L.infonce(A, P, negatives=jnp.zeros((B, 0, D)), in_batch_negatives=False),
     r"`in_batch_negatives=False` needs `negatives` .* got shape \(8, 0, 16\)"),
    (lambda: L.positive_aware_infonce(A, P, hard_negatives=jnp.zeros((B, 0, D)), in_batch_negatives=False),
     r"`in_batch_negatives=False` needs `hard_negatives` .* got shape \(8, 0, 16\)"),
    (lambda: L.dual_view_moco(A, P, jnp.zeros((0, D))), r"`queue` needs at least 1 example"),
    (lambda: L.ce_clip(A, P, jnp.zeros((B, 0, D))), r"`hard_negatives` needs at least 1 example"),
])
def test_no_negative_at_all_is_an_error(call, match):
  """These returned 0.0: a loss with nothing to contrast against."""
  with pytest.raises(ValueError, match=match):
    call()


def test_empty_negatives_with_in_batch_negatives_are_the_in_batch_loss():
  np.testing.assert_allclose(float(L.infonce(A, P, negatives=jnp.zeros((0, D)))), float(L.infonce(A, P)),
                             rtol=1e-6)


# ------------------------------------------------------------------------------ positional misuse
def _first_keyword(fn) -> str | None:
  params = inspect.signature(fn).parameters.values()
  return next((p.name for p in params if p.kind == p.KEYWORD_ONLY), None)


def _positional(fn) -> list[str]:
  params = inspect.signature(fn).parameters.values()
  return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


FUNCTIONS = sorted(n for n in L.__all__ if inspect.isfunction(getattr(L, n)))
VARIADIC = [n for n in FUNCTIONS if any(p.kind == p.VAR_POSITIONAL
                                        for p in inspect.signature(getattr(L, n)).parameters.values())]


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if n not in VARIADIC])
def test_an_extra_positional_argument_names_the_function_and_the_keyword(name):
  """`clip(a, b, 10.)`: the error names clip and `logit_scale=10.0` (it named neither for the losses
  wrapped by `shardable`, and no keyword for the others)."""
  fn = getattr(L, name)
  positional = _positional(fn)
  args = [A] * len(positional) + [0.25]
  with pytest.raises(TypeError) as info:
    fn(*args)
  message = str(info.value)
  assert f"{name}()" in message, message
  keyword = _first_keyword(fn)
  if keyword is not None:
    assert f"pass {keyword}=0.25 by keyword" in message, message
    assert f"({', '.join(positional)})" in message, message


def test_variadic_losses_are_the_ones_expected():
  assert VARIADIC == ["gram", "gram_negatives", "gram_volume", "symile"]  # any number of arrays is their positional API


def test_keyword_only_keeps_the_signature_and_docstring():
  assert list(inspect.signature(L.clip).parameters)[:3] == ["image", "text", "logit_scale"]
  assert "CLIP" in L.clip.__doc__
  assert L.clip.__name__ == "clip"
