"""The sharded engines (allgather, ring) against the unsharded dense loss, on 8 CPU devices."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcl import losses
from jaxcl import ops
from jaxcl.ops import blockwise
from jaxcl.ops import pallas
from jaxcl.ops import sharded
from tests.helpers import assert_padded_equals_unpadded, assert_value_and_grads_close, device_mesh, pad_batch, randn

SHARDED = ("allgather", "ring")


def _labels(seed, n, classes=4):
  return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)


# Each case: (a, b, s) -> loss with keyword options; s is the learnable scale (1/temperature).
def _cases(batch, dim, seed=0):
  queue = jnp.asarray(randn(seed + 7, 24, dim))  # splits over 1, 2, 3, 4 or 8 devices
  labels = jnp.asarray(_labels(seed + 3, batch))
  return {
      "clip": lambda a, b, s, **kw: losses.clip(a, b, logit_scale=s, **kw),
      "siglip": lambda a, b, s, **kw: losses.siglip(a, b, logit_scale=s, logit_bias=-2.0, **kw),
      "infonce": lambda a, b, s, **kw: losses.infonce(a, b, temperature=1 / s, **kw),
      "infonce_queue": lambda a, b, s, **kw: losses.infonce(a, b, temperature=1 / s, negatives=queue, **kw),
      "nt_xent": lambda a, b, s, **kw: losses.nt_xent(a, b, temperature=1 / s, **kw),
      "dcl": lambda a, b, s, **kw: losses.dcl(a, b, temperature=1 / s, **kw),
      "dclw": lambda a, b, s, **kw: losses.dclw(a, b, temperature=1 / s, **kw),
      "supcon": lambda a, b, s, **kw: losses.supcon(jnp.stack([a, b], 1), labels, temperature=1 / s, **kw),
      "supcon_1view": lambda a, b, s, **kw: losses.supcon(a, labels, temperature=1 / s, **kw),
      # objectives of docs/objectives.md with a global-batch form
      "macl": lambda a, b, s, **kw: losses.macl(a, b, temperature=0.3, **kw),  # τ₀: a Python number
      "hn_nce": lambda a, b, s, **kw: losses.hn_nce(a, b, temperature=1 / s, **kw),
      "mcl_nt_xent": lambda a, b, s, **kw: losses.mcl_nt_xent(a, b, labels, temperature=1 / s, **kw),
      "grouped_itc": lambda a, b, s, **kw: losses.grouped_itc(a, b, labels, logit_scale=s, **kw),
      "nnclr": lambda a, b, s, **kw: losses.nnclr(a, b, queue, temperature=1 / s, **kw),  # queue: the support set
  }


def _value_and_grads(fn, a, b, s):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(a, b, s)


def _assert_close(got, want, rtol=1e-5):
  assert_value_and_grads_close(got, want, rtol=rtol, names=("a", "b", "scale"))


@functools.lru_cache(maxsize=None)
def _every_loss_inputs_and_dense(n_devices):
  """(a, b, {loss name: dense value and grads}) of `test_every_loss_equals_unsharded_dense` for a
  device count: computed once for both sharded engines."""
  batch, dim = 5 * n_devices, 6
  a, b = jnp.asarray(randn(1, batch, dim)), jnp.asarray(randn(2, batch, dim))
  cases = _cases(batch, dim)
  return a, b, {name: _value_and_grads(functools.partial(loss, impl="dense"), a, b, 4.0)
                for name, loss in cases.items()}


# Each engine once (the suite's time: ~20 s a case): the ring on an odd count of devices (3: hops that
# are not powers of two), allgather on the test mesh's 8. (A one-device mesh: the next test; the ring
# on 8 devices: the trainer's tests.)
@pytest.mark.parametrize("impl, n_devices", [("ring", 3), ("allgather", 8)])
def test_every_loss_equals_unsharded_dense(impl, n_devices, monkeypatch):
  # 5 rows per device: not a multiple of the 2-column tiles the ring's blockwise steps use here.
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 2)
  a, b, wants = _every_loss_inputs_and_dense(n_devices)
  mesh = device_mesh(n_devices)
  for name, loss in _cases(*a.shape).items():
    want = wants[name]
    got = _value_and_grads(functools.partial(loss, impl=impl, mesh=mesh), a, b, 4.0)
    try:
      _assert_close(got, want)
    except AssertionError as e:
      raise AssertionError(f"{name} on {n_devices} devices with impl={impl}") from e


@pytest.mark.parametrize("impl", SHARDED)
def test_a_one_device_mesh_equals_dense(impl):
  """A sharded engine on a mesh of one device (a ring of one hop, a gather of one shard) is the dense
  loss, for the softmax (clip) and the sigmoid (siglip) families."""
  a, b = jnp.asarray(randn(7, 10, 6)), jnp.asarray(randn(8, 10, 6))
  for name, loss in (("clip", losses.clip), ("siglip", functools.partial(losses.siglip, logit_bias=-2.0))):
    want = _value_and_grads(lambda a, b, s: loss(a, b, logit_scale=s, impl="dense"), a, b, 4.0)
    sharded = lambda a, b, s: loss(a, b, logit_scale=s, impl=impl, mesh=device_mesh(1))  # noqa: E731
    assert "shard_map" in str(jax.make_jaxpr(sharded)(a, b, 4.0))  # the engine itself, not a fallback
    got = _value_and_grads(sharded, a, b, 4.0)
    try:
      _assert_close(got, want)
    except AssertionError as e:
      raise AssertionError(f"{name} with impl={impl}") from e


@pytest.mark.parametrize("impl", SHARDED + ("auto",))
def test_inside_user_shard_map(impl):
  """The first way to call: local shards inside the user's own shard_map, `axis_name="data"`."""
  batch, dim = 16, 8
  a, b = jnp.asarray(randn(3, batch, dim)), jnp.asarray(randn(4, batch, dim))
  mesh = device_mesh(4)

  def local_loss(a, b, s):
    value = losses.clip(a, b, logit_scale=s, impl=impl, axis_name="data")
    return value, value[None]  # out_specs P("data"): each device's own copy, to check they agree

  def loss(a, b, s):
    value, everywhere = jax.shard_map(
        local_loss, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P(), P("data"))
    )(a, b, s)
    return value, everywhere

  (value, everywhere), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(a, b, 10.0)
  np.testing.assert_array_equal(np.asarray(everywhere), np.full(4, float(value)))
  want = _value_and_grads(lambda a, b, s: losses.clip(a, b, logit_scale=s, impl="dense"), a, b, 10.0)
  _assert_close((value, grads), want)


def test_ambient_mesh_with_explicit_sharded_arrays():
  """The second way: globally sharded arrays under jit, the mesh from `jax.set_mesh`."""
  batch, dim = 32, 8
  mesh = device_mesh(8, jax.sharding.AxisType.Explicit)
  a_np, b_np = randn(5, batch, dim), randn(6, batch, dim)
  want = _value_and_grads(lambda a, b, s: losses.siglip(a, b, logit_scale=s, logit_bias=-3.0, impl="dense"),
                          jnp.asarray(a_np), jnp.asarray(b_np), 7.0)
  with jax.set_mesh(mesh):
    a = jax.device_put(a_np, NamedSharding(mesh, P("data")))
    b = jax.device_put(b_np, NamedSharding(mesh, P("data")))
    got = _value_and_grads(
        lambda a, b, s: losses.siglip(a, b, logit_scale=s, logit_bias=-3.0, impl="ring"), a, b, 7.0
    )
    assert got[1][0].sharding.spec[0] == "data"  # the gradient stays sharded like the input
  _assert_close(got, want)


@pytest.mark.parametrize("impl", SHARDED)
def test_mesh_with_explicit_axes_takes_unsharded_arrays(impl):
  """`jax.make_mesh`'s default axes are Explicit: `mesh=` of such a mesh with plain (unsharded) arrays,
  eagerly and under jit, gives the unsharded loss and its gradients."""
  batch, dim = 16, 8
  a, b = jnp.asarray(randn(9, batch, dim)), jnp.asarray(randn(10, batch, dim))
  mesh = device_mesh(4, jax.sharding.AxisType.Explicit)
  loss = lambda a, b, s, **kw: losses.clip(a, b, logit_scale=s, **kw)
  want = _value_and_grads(functools.partial(loss, impl="dense"), a, b, 10.0)
  _assert_close(_value_and_grads(functools.partial(loss, impl=impl, mesh=mesh), a, b, 10.0), want)
  np.testing.assert_allclose(float(loss(a, b, 10.0, impl=impl, mesh=mesh)), float(want[0]), rtol=1e-5)


@pytest.mark.parametrize("impl", SHARDED)
def test_bf16_inputs(impl):
  batch, dim = 24, 16
  a = jnp.asarray(randn(7, batch, dim), jnp.bfloat16)
  b = jnp.asarray(randn(8, batch, dim), jnp.bfloat16)
  loss = lambda a, b, s, **kw: losses.clip(a, b, logit_scale=s, **kw)
  want = _value_and_grads(functools.partial(loss, impl="dense"), a, b, 10.0)
  got = _value_and_grads(functools.partial(loss, impl=impl, mesh=device_mesh(4)), a, b, 10.0)
  assert got[1][0].dtype == jnp.bfloat16
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-3)
  for x, y in zip(got[1][:2], want[1][:2]):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, atol=2e-2 * np.max(np.abs(y)))


def _masked_reduction_inputs(n=4, rows_per=5, cols_per=7, dim=6):
  """q (n·rows_per, dim), k (n·cols_per, dim), a per-row scale, include ids (row 0 matches no column)
  and exclude ids, for reductions over n devices."""
  q, k = jnp.asarray(randn(9, n * rows_per, dim)), jnp.asarray(randn(10, n * cols_per, dim))
  scale = jnp.asarray(np.random.default_rng(0).uniform(0.5, 3.0, n * rows_per).astype(np.float32))
  row_ids = jnp.asarray(_labels(11, n * rows_per, 3)).at[0].set(99)  # row 0 matches no column
  col_ids = jnp.asarray(_labels(12, n * cols_per, 3))
  ex_r, ex_c = jnp.arange(n * rows_per) % 5, jnp.arange(n * cols_per) % 5
  return q, k, scale, row_ids, col_ids, ex_r, ex_c


@pytest.mark.parametrize("impl", SHARDED)
def test_masks_and_per_row_scale_in_the_reductions(impl, monkeypatch):
  """Row and column log-sum-exp with exclude + include id masks, a per-row scale and a row with no
  valid entry (-inf with zero gradient), against the dense engine."""
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  n, rows_per, cols_per = 4, 5, 7
  q, k, scale, row_ids, col_ids, ex_r, ex_c = _masked_reduction_inputs(n, rows_per, cols_per)
  weights_r, weights_c = jnp.asarray(randn(13, n * rows_per)), jnp.asarray(randn(14, n * cols_per))

  def objective(out):
    rows = jnp.where(jnp.isfinite(out.rows), out.rows, 0.0)
    return jnp.sum(rows * weights_r), jnp.sum(out.cols * weights_c)

  def dense(q, k, scale):
    out = ops.logsumexp(q, k, scale=scale, rows=True, cols=True, exclude=(ex_r, ex_c),
                        include=(row_ids, col_ids), impl="dense")
    return sum(objective(out)), out.rows

  def local(q, k, scale, ex_r, ex_c, row_ids, col_ids, weights_r, weights_c):
    out = ops.logsumexp(q, k, scale=scale, rows=True, cols=True, exclude=(ex_r, ex_c),
                        include=(row_ids, col_ids), impl=impl, axis_name="data")
    rows = jnp.where(jnp.isfinite(out.rows), out.rows, 0.0)
    total = jnp.sum(rows * weights_r) + jnp.sum(out.cols * weights_c)
    return jax.lax.psum(total, "data"), out.rows

  def split(q, k, scale):
    return jax.shard_map(local, mesh=device_mesh(n), in_specs=(P("data"),) * 9, out_specs=(P(), P("data")))(
        q, k, scale, ex_r, ex_c, row_ids, col_ids, weights_r, weights_c
    )

  (want, want_rows), want_g = jax.value_and_grad(dense, argnums=(0, 1, 2), has_aux=True)(q, k, scale)
  (got, got_rows), got_g = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2), has_aux=True))(q, k, scale)
  assert float(got_rows[0]) == -np.inf and float(want_rows[0]) == -np.inf
  _assert_close((got, got_g), (want, want_g))


@pytest.mark.parametrize("impl", SHARDED)
def test_kernel_hops_equal_dense(impl):
  """`local_impl="pallas"`: each device reduces its block with the fused kernels (Pallas interpret mode
  here; Mosaic / Triton where compiled for a TPU / GPU, tests/test_compile_targets.py) — the ring at
  every hop, forward and backward from the global results. Row and column log-sum-exp with exclude +
  include masks, a per-row scale and a row with no valid entry, and the sigmoid sum with id positives
  and a bias, in value and gradient against the dense engine, for both per-hop engines (and the
  pallas engine with settings of its own: the Triton kernels in 16 × 16 blocks).

  Pallas's interpreter cannot yet run under `shard_map`'s device-varying type checks (the kernel's
  jaxpr mixes varying and unvarying values), so this shard_map turns them off; the compiled kernels
  run with them on."""
  n, rows_per, cols_per = 4, 5, 7
  q, k, scale, row_ids, col_ids, ex_r, ex_c = _masked_reduction_inputs(n, rows_per, cols_per)
  pos_r, pos_c = jnp.arange(n * rows_per) % 9, jnp.arange(n * cols_per) % 9
  w_r, w_c, w_s = (jnp.asarray(randn(25 + i, m)) for i, m in enumerate((n * rows_per, n * cols_per, n * rows_per)))
  bias = jnp.asarray(-1.5)

  def objective(rows, cols, sig, w_r, w_c, w_s):
    rows = jnp.where(jnp.isfinite(rows), rows, 0.0)
    return jnp.sum(rows * w_r) + jnp.sum(cols * w_c) + jnp.sum(sig * w_s)

  def dense(q, k, scale, bias):
    out = ops.logsumexp(q, k, scale=scale, rows=True, cols=True, exclude=(ex_r, ex_c),
                        include=(row_ids, col_ids), impl="dense")
    sig = ops.sigmoid_sum(q, k, scale=scale, bias=bias, positives=(pos_r, pos_c), impl="dense")
    return objective(out.rows, out.cols, sig, w_r, w_c, w_s)

  def split(local_impl):
    def local(q, k, scale, bias, ex_r, ex_c, row_ids, col_ids, pos_r, pos_c, w_r, w_c, w_s):
      kw = dict(axis_name="data", impl=impl, local_impl=local_impl, tile=3)
      rows, cols = sharded.logsumexp(q, k, scale=scale, rows=True, cols=True, exclude=(ex_r, ex_c),
                                     include=(row_ids, col_ids), **kw)
      sig = sharded.sigmoid_sum(q, k, scale=scale, bias=bias, positives=(pos_r, pos_c), **kw)
      return jax.lax.psum(objective(rows, cols, sig, w_r, w_c, w_s), "data")

    def run(q, k, scale, bias):
      specs = (P("data"),) * 3 + (P(),) + (P("data"),) * 9
      return jax.shard_map(local, mesh=device_mesh(n), in_specs=specs, out_specs=P(), check_vma=False)(
          q, k, scale, bias, ex_r, ex_c, row_ids, col_ids, pos_r, pos_c, w_r, w_c, w_s)

    return jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2, 3)))

  want_v, want_g = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(q, k, scale, bias)
  triton_16 = pallas.Settings(flavour="gpu", interpret=True, block_rows=16, block_cols=16)  # settings
  for local_impl in ("pallas", triton_16, "blockwise"):
    got_v, got_g = split(local_impl)(q, k, scale, bias)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5, err_msg=str(local_impl))
    for name, x, y in zip(("q", "k", "scale", "bias"), got_g, want_g):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      np.testing.assert_allclose(x, y, atol=1e-5 * max(np.max(np.abs(y)), 1.0), err_msg=f"{local_impl} {name}")


def test_local_impl_is_checked():
  a = jnp.asarray(randn(0, 8, 4))
  run = lambda x: sharded.logsumexp(x, x, scale=1.0, rows=True, cols=False, exclude=None, include=None,
                                    axis_name="data", local_impl="dense")
  with pytest.raises(ValueError, match="`local_impl` must be one of .*'dense'"):
    jax.shard_map(run, mesh=device_mesh(2), in_specs=P("data"), out_specs=P("data"))(a)
  run = lambda x: sharded.logsumexp(x, x, scale=1.0, rows=True, cols=False, exclude=None, include=None,
                                    axis_name="data", local_impl=3)
  with pytest.raises(TypeError, match=r"^`local_impl` must be an engine name or engine settings .*got 3\."):
    jax.shard_map(run, mesh=device_mesh(2), in_specs=P("data"), out_specs=P("data"))(a)


# name -> (loss(a, b, **kw), anchors per sample): the losses with `mask` and `reduction`.
def _masked_cases(dim):
  queue = jnp.asarray(randn(17, 24, dim))
  labels = jnp.asarray(np.array([0, 1, 0, 1, 2], np.int32))
  return {
      "clip": (lambda a, b, **kw: losses.clip(a, b, logit_scale=4.0, **kw), 2),
      "clip_smoothed": (lambda a, b, **kw: losses.clip(a, b, logit_scale=4.0, label_smoothing=0.2, **kw), 2),
      "siglip": (lambda a, b, **kw: losses.siglip(a, b, logit_scale=4.0, logit_bias=-2.0, **kw), 1),
      "infonce": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.25, **kw), 1),
      "infonce_queue": (lambda a, b, **kw: losses.infonce(a, b, temperature=0.25, negatives=queue, **kw), 1),
      "nt_xent": (lambda a, b, **kw: losses.nt_xent(a, b, temperature=0.25, **kw), 2),
      "dcl": (lambda a, b, **kw: losses.dcl(a, b, temperature=0.25, **kw), 2),
      "dclw": (lambda a, b, **kw: losses.dclw(a, b, temperature=0.25, **kw), 2),
      "hn_nce": (lambda a, b, **kw: losses.hn_nce(a, b, temperature=0.25, **kw), 2),
      "supcon": (lambda a, b, y=labels, **kw: losses.supcon(jnp.stack([a, b], 1), y, temperature=0.25, **kw), 2),
  }


@pytest.mark.parametrize("impl", SHARDED)
def test_padded_batch_with_mask_equals_unpadded_dense_batch(impl, monkeypatch):
  """5 samples padded with 3 garbage rows to 8 = 2 per device on 4 devices: the loss and gradients of
  the unpadded batch (on one device, dense), exactly zero gradients on the padding rows."""
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 1)  # the ring's blockwise steps with several tiles
  mesh, dim = device_mesh(4), 4
  a, b = randn(20, 5, dim), randn(21, 5, dim)
  (pa, pb, plabels), mask = pad_batch(0, [a, b, np.array([0, 1, 0, 1, 2], np.int32)], 3)
  for name, (loss, _) in _masked_cases(dim).items():
    kw = {"y": jnp.asarray(plabels)} if name == "supcon" else {}
    try:
      assert_padded_equals_unpadded(
          lambda a, b, **k: loss(a, b, impl=impl, mesh=mesh, **kw, **k), [a, b],
          unpadded_loss=lambda a, b: loss(a, b, impl="dense"), rtol=2e-6,
      )
    except AssertionError as e:
      raise AssertionError(f"{name} with impl={impl}") from e


@pytest.mark.parametrize("impl", SHARDED)
def test_reduction_none_under_a_mesh_returns_every_devices_anchors(impl):
  mesh, dim = device_mesh(4), 4
  a, b = jnp.asarray(randn(22, 8, dim)), jnp.asarray(randn(23, 8, dim))
  mask = jnp.asarray(np.array([1, 1, 0, 1, 1, 1, 0, 1], bool))
  for name, (loss, per_sample) in _masked_cases(dim).items():
    if name == "supcon":
      continue  # its labels have 5 samples
    # jitted: an eager call would run the shard_map body one primitive at a time (minutes per loss)
    dense = np.asarray(jax.jit(lambda a, b: loss(a, b, impl="dense", reduction="none", mask=mask))(a, b))
    got = np.asarray(jax.jit(lambda a, b: loss(a, b, impl=impl, mesh=mesh, reduction="none", mask=mask))(a, b))
    assert got.shape == (per_sample * 8,), name
    # each device's anchors in turn: per device [its first views; its second views] for two-view losses
    order = np.concatenate([
        np.concatenate([np.arange(2 * d, 2 * d + 2) + v * 8 for v in range(per_sample)]) for d in range(4)
    ])
    np.testing.assert_allclose(got, dense[order], rtol=2e-6, atol=1e-6, err_msg=name)
    mean = float(jax.jit(lambda a, b: loss(a, b, impl=impl, mesh=mesh, mask=mask))(a, b))
    np.testing.assert_allclose(got.sum() / (per_sample * 6), mean, rtol=2e-6, err_msg=name)


@pytest.mark.parametrize("impl", SHARDED)
def test_mcl_nt_xent_padded_batch_with_mask_equals_unpadded_dense_batch(impl, monkeypatch):
  """As above for `mcl_nt_xent`, whose cluster ids are a third batch argument (padding rows get random
  ids, so they would join real clusters without the mask); then "none" under the mesh: each device's
  [z1; z2] anchors in turn."""
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 1)
  mesh, dim = device_mesh(4), 4
  a, b, c = randn(26, 5, dim), randn(27, 5, dim), np.array([0, 1, 0, 1, 1], np.int32)
  (pa, pb, pc), mask = pad_batch(0, [a, b, c], 3)
  loss = lambda a, b, **kw: losses.mcl_nt_xent(a, b, kw.pop("c", pc), temperature=0.25, **kw)
  assert_padded_equals_unpadded(
      lambda a, b, **k: loss(a, b, impl=impl, mesh=mesh, **k), [a, b],
      unpadded_loss=lambda a, b: loss(a, b, c=c, impl="dense"), rtol=2e-6,
  )
  pa, pb, mask = jnp.asarray(pa), jnp.asarray(pb), jnp.asarray(mask)
  dense = np.asarray(jax.jit(lambda a, b: loss(a, b, impl="dense", reduction="none", mask=mask))(pa, pb))
  got = np.asarray(jax.jit(lambda a, b: loss(a, b, impl=impl, mesh=mesh, reduction="none", mask=mask))(pa, pb))
  order = np.concatenate([np.concatenate([np.arange(2 * d, 2 * d + 2) + v * 8 for v in range(2)]) for d in range(4)])
  np.testing.assert_allclose(got, dense[order], rtol=2e-6, atol=1e-6)
  mean = jax.jit(lambda a, b: loss(a, b, impl=impl, mesh=mesh, mask=mask))(pa, pb)
  np.testing.assert_allclose(got.sum() / 10, float(mean), rtol=2e-6)


@pytest.mark.parametrize("impl", SHARDED)
def test_one_row_per_device_is_a_global_batch(impl):
  """Issue 12 item 8: global B = 2 on 2 devices (one row each) has a negative; it used to be refused
  with "needs at least 2 examples"."""
  mesh, dim = device_mesh(2), 4
  a, b = jnp.asarray(randn(24, 2, dim)), jnp.asarray(randn(25, 2, dim))
  for name, (loss, _) in _masked_cases(dim).items():
    if name == "infonce_queue":
      continue  # inside shard_map the queue would be each device's shard of it
    kw = {"y": jnp.array([3, 3])} if name == "supcon" else {}
    want = float(loss(a, b, impl="dense", **kw))

    def local(a, b, loss=loss, kw=kw):
      if name == "supcon":
        kw = {"y": kw["y"][jax.lax.axis_index("data")][None]}
      return loss(a, b, impl=impl, axis_name="data", **kw)

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))(a, b)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=name)
  for name, loss in (("macl", losses.macl), ("hn_nce", losses.hn_nce)):
    want = float(loss(a, b, temperature=0.3, impl="dense"))
    got = jax.jit(jax.shard_map(lambda a, b, loss=loss: loss(a, b, temperature=0.3, impl=impl, axis_name="data"),
                                mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))(a, b)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match=r"`image` needs at least 2 examples in the global batch .* 1 per device "
                                       r"on 1 devices"):
    jax.shard_map(lambda a, b: losses.clip(a, b, logit_scale=1.0, axis_name="data"), mesh=device_mesh(1),
                  in_specs=(P("data"), P("data")), out_specs=P())(a[:1], b[:1])


@pytest.mark.parametrize("impl", SHARDED)
def test_retrieval_accuracy_over_the_global_batch(impl, monkeypatch):
  """In-batch top-1 accuracy on 4 devices (each row's positive and best negatives on other devices)
  against float64 NumPy argmax, with and without a mask; rows per device not a multiple of the tile."""
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  rng = np.random.default_rng(5)
  a = randn(30, 20, 6)
  b = a + 1.2 * randn(31, 20, 6)
  valid = rng.random(20) < 0.75
  norm = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  s = np.where(valid[:, None] & valid[None, :], norm(a) @ norm(b).T, -np.inf)
  for mask in (None, valid):
    keep = np.ones(20, bool) if mask is None else mask
    s_m = norm(a) @ norm(b).T if mask is None else s
    rows = np.mean([np.argmax(s_m[i]) == i for i in np.flatnonzero(keep)])
    cols = np.mean([np.argmax(s_m[:, j]) == j for j in np.flatnonzero(keep)])
    assert 0 < rows < 1 and 0 < cols < 1
    m = None if mask is None else jnp.asarray(mask)
    got = jax.jit(lambda a, b, m=m: losses.retrieval_accuracy(a, b, impl=impl, mesh=device_mesh(4), mask=m))(
        jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose([float(got.a_to_b), float(got.b_to_a)], [rows, cols], rtol=1e-6)


def test_ring_memory_does_not_grow_with_the_global_batch():
  """Per-device compiled temporaries of the ring clip loss at B/n fixed: flat as devices are added
  (B grows), and far below the allgather engine, which holds all B keys. D = 128, so that the blocks
  of D-vectors, not the O(B) vectors of ids and row statistics (about 80 KB more on 8 devices than on 2
  here), make up most of them."""
  rows_per, dim = 256, 128

  def temp_bytes(impl, n):
    mesh = device_mesh(n)
    a = jax.ShapeDtypeStruct((n * rows_per, dim), jnp.float32)
    fn = jax.jit(jax.grad(lambda a, b: losses.clip(a, b, logit_scale=10.0, impl=impl, mesh=mesh), (0, 1)))
    return fn.lower(a, a).compile().memory_analysis().temp_size_in_bytes

  ring = [temp_bytes("ring", n) for n in (2, 8)]
  gather = temp_bytes("allgather", 8)
  assert ring[1] <= 1.2 * ring[0], ring
  assert gather > 2 * ring[1], (gather, ring)


def test_auto_picks_allgather_for_small_blocks_and_ring_for_large():
  assert sharded.resolve("auto", 1024, 8192) == "allgather"
  assert sharded.resolve("auto", 8192, 65536) == "ring"
  # the gathered keys (B, D) count too: at most 2²⁴ values
  assert sharded.resolve("auto", 1024, 8192, 2048) == "allgather"
  assert sharded.resolve("auto", 1024, 8192, 2049) == "ring"
  with pytest.raises(ValueError, match="`impl` must be one of"):
    sharded.resolve("blockwise", 8, 8)


def test_auto_on_a_mesh_takes_the_sharded_engine_and_equals_dense(monkeypatch):
  """The default `impl="auto"` on batch-sharded global arrays under `jax.set_mesh` (8 devices) runs
  the loss under shard_map (a sharded engine: no device builds the global (B, B) matrix), with the
  values and gradients of the dense single-device loss (softmax, sigmoid and label-sharing losses)."""
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 2)
  batch, dim = 24, 6
  a_np, b_np = randn(11, batch, dim), randn(12, batch, dim)
  cases = {name: loss for name, loss in _cases(batch, dim, seed=4).items() if name in ("clip", "siglip", "supcon")}
  wants = {name: _value_and_grads(functools.partial(loss, impl="dense"), jnp.asarray(a_np),
                                  jnp.asarray(b_np), 4.0) for name, loss in cases.items()}
  mesh = device_mesh(8, jax.sharding.AxisType.Explicit)
  with jax.set_mesh(mesh):
    a = jax.device_put(a_np, NamedSharding(mesh, P("data")))
    b = jax.device_put(b_np, NamedSharding(mesh, P("data")))
    for name, loss in cases.items():
      assert "shard_map" in str(jax.make_jaxpr(loss)(a, b, 4.0)), name
      try:
        _assert_close(_value_and_grads(loss, a, b, 4.0), wants[name])
      except AssertionError as e:
        raise AssertionError(f"{name} with impl='auto'") from e
  with jax.set_mesh(device_mesh(8)):  # Auto axes: the batch is taken to be split over the "data" axis
    assert "shard_map" in str(jax.make_jaxpr(cases["clip"])(a_np, b_np, 4.0))


def test_auto_stays_on_one_device_without_a_split_batch():
  """`impl="auto"` runs the loss as written (GSPMD partitions it) when the batch is not split over
  more than one device: no mesh, a one-device mesh, a batch (or queue) that does not divide over the
  devices, replicated arrays on an Explicit mesh, or inside the user's shard_map without `axis_name`."""
  a, b = jnp.asarray(randn(13, 12, 4)), jnp.asarray(randn(14, 12, 4))
  loss = lambda a, b: losses.clip(a, b, logit_scale=3.0)
  for mesh in (None, device_mesh(1), device_mesh(8), device_mesh(4, jax.sharding.AxisType.Explicit)):  # 12 % 8 != 0
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      assert "shard_map" not in str(jax.make_jaxpr(loss)(a, b)), mesh
  # `mesh=` with auto and a MoCo queue of 10 that does not split over 4 devices: one device, no error
  queue = jnp.asarray(randn(15, 10, 4))
  with_queue = lambda a, b, **kw: losses.infonce(a, b, temperature=0.5, negatives=queue, **kw)
  assert "shard_map" not in str(jax.make_jaxpr(lambda a, b: with_queue(a, b, mesh=device_mesh(4)))(a, b))
  np.testing.assert_allclose(float(with_queue(a, b, mesh=device_mesh(4))), float(with_queue(a, b, impl="dense")),
                             rtol=1e-5)
  local = jax.shard_map(lambda a, b: loss(a, b)[None], mesh=device_mesh(4), in_specs=(P("data"), P("data")),
                        out_specs=P("data"))
  per_device = local(a, b)  # each device's own 3-row batch
  np.testing.assert_allclose(per_device[1], losses.clip(a[3:6], b[3:6], logit_scale=3.0, impl="dense"),
                             rtol=1e-5)


@pytest.mark.parametrize("batch", [65536, 64000])
def test_auto_on_a_tpu_pod_mesh_compiles_without_a_b_by_b_buffer(batch):
  """Compiled here for 4 TPU v5e chips (`jaxcl.targets`, nothing runs): CLIP forward and backward at
  the default impl on a (65,536, 256) bf16 batch split over the chips. auto picks the ring (one
  device's block, 16,384 × 65,536, is far above the dense size): collective permutes, no all-gather of
  the keys, the Mosaic kernels at every hop, and per-chip temporaries within the issue's 64 MiB (a
  (B/4, B) float32 block would be 4 GiB). Compiled: 43 MiB (107 MiB while one backward ring carried
  each key block's float32 dk with it and every hop's kernels wrote fresh float32 gradients). And at
  B = 64,000, 16,000 rows per chip, not a multiple of the kernels' tiles: the shards are padded once
  for the whole ring, 59 MiB (91 MiB while every hop padded them)."""
  from jaxcl import targets  # noqa: PLC0415

  target = targets.get("v5e:2x2")
  mesh = targets.mesh(target)
  dim = 256
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
  loss = lambda a, b: losses.clip(a, b, logit_scale=10.0)
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
  hlo = compiled.as_text()
  assert "collective-permute" in hlo and "all-gather" not in hlo
  # (the forward, the dq and the dk ring) × (loop body, last step)
  assert targets.kernel_calls(compiled) == {"mosaic": 6, "triton": 0}
  memory = targets.memory(compiled)
  assert memory.argument_bytes == 2 * (batch // 4) * dim * 2  # each chip holds its quarter of a and b
  assert memory.temp_bytes <= 64 * 2**20, memory


def test_errors_name_the_problem():
  a = jnp.asarray(randn(0, 12, 4))
  with pytest.raises(ValueError, match="needs a device mesh"):
    losses.clip(a, a, logit_scale=1.0, impl="ring")
  with pytest.raises(ValueError, match="multiple of 8"):
    losses.clip(a, a, logit_scale=1.0, impl="ring", mesh=device_mesh(8))
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    losses.clip(a, a, logit_scale=1.0, impl="ring", mesh=device_mesh(4), axis_name="batch")
  with pytest.raises(ValueError, match="for a loss over a mesh"):
    losses.clip(a, a, logit_scale=1.0, impl="blockwise", mesh=device_mesh(4))
  with pytest.raises(ValueError, match="sharded engine: it needs `axis_name`"):
    ops.logsumexp(a, a, scale=1.0, impl="ring")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_ring_clip_equals_single_process_reference(tmp_path):
  """jax.distributed over two local processes (2 CPU devices each, gloo collectives): the ring CLIP loss
  and its gradients over the 4-device mesh equal the single-process dense reference."""
  port, n = _free_port(), 2
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.workers.ring_clip_process", str(i), str(n), str(port),
           str(tmp_path / f"out{i}.npz")],
          cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(n)
  ]
  for p in procs:
    try:
      output, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, output[-3000:]
  for i in range(n):
    r = np.load(tmp_path / f"out{i}.npz")
    np.testing.assert_allclose(r["value"], r["ref_value"], rtol=1e-5)
    np.testing.assert_allclose(r["g_scale"], r["r_scale"], rtol=1e-5)
    for got, want in (("g_image", "r_image"), ("g_text", "r_text")):
      norm = np.max(np.abs(r[want]))
      np.testing.assert_allclose(r[got] / norm, r[want] / norm, atol=1e-5)
