"""jaxcl.ops.reductions: `row_valid` / `col_valid` (a padded batch) in every single-device engine, against
the dense engine on the unpadded matrix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import ops
from jaxcl.ops import blockwise
from jaxcl.ops import engines
from jaxcl.ops import masks
from jaxcl.ops import pallas
from tests.helpers import randn

ENGINES = ("dense", "blockwise", "pallas")


def _padded(seed, bq, bk, d):
  """q (Bq, D), k (Bk, D) holding large garbage in the invalid rows, and the validity flags."""
  rng = np.random.default_rng(seed)
  row_valid = rng.random(bq) < 0.7
  col_valid = rng.random(bk) < 0.7
  row_valid[0] = col_valid[0] = col_valid[-1] = True
  row_valid[1] = col_valid[1] = False
  q, k = randn(seed + 1, bq, d), randn(seed + 2, bk, d)
  q[~row_valid] = 1e4 * randn(seed + 3, int((~row_valid).sum()), d)
  k[~col_valid] = 1e4 * randn(seed + 4, int((~col_valid).sum()), d)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(row_valid), jnp.asarray(col_valid)


def _weights(n, phase):
  return jnp.cos(phase + jnp.arange(n, dtype=jnp.float32))


def _lse_objective(impl, rows_valid, cols_valid, include):
  def f(q, k, scale):
    out = ops.logsumexp(q, k, scale=scale, rows=True, cols=True, include=include, impl=impl,
                        row_valid=rows_valid, col_valid=cols_valid)
    finite = lambda x, w: jnp.sum(jnp.where(jnp.isfinite(x), w * x, 0.0))
    return finite(out.rows, _weights(q.shape[0], 0.0)) + finite(out.cols, _weights(k.shape[0], 1.0)), out
  return f


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("with_include", [False, True])
def test_logsumexp_with_invalid_rows_and_columns_equals_the_unpadded_matrix(impl, with_include, monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  bq, bk, d = 11, 9, 4
  q, k, rv, cv = _padded(0, bq, bk, d)
  scale = jnp.asarray(3.0)
  include = None
  if with_include:
    include = (jnp.asarray(np.arange(bq) % 3, jnp.int32), jnp.asarray(np.arange(bk) % 2, jnp.int32))
  (v, out), grads = jax.value_and_grad(_lse_objective(impl, rv, cv, include), argnums=(0, 1, 2), has_aux=True)(
      q, k, scale)

  ri, ci = np.flatnonzero(rv), np.flatnonzero(cv)
  sub_include = None if include is None else (include[0][ri], include[1][ci])

  def unpadded(q_s, k_s, scale):
    o = ops.logsumexp(q_s, k_s, scale=scale, rows=True, cols=True, include=sub_include, impl="dense")
    finite = lambda x, w: jnp.sum(jnp.where(jnp.isfinite(x), w * x, 0.0))
    return finite(o.rows, _weights(bq, 0.0)[ri]) + finite(o.cols, _weights(bk, 1.0)[ci]), o

  (want_v, want), want_g = jax.value_and_grad(unpadded, argnums=(0, 1, 2), has_aux=True)(q[ri], k[ci], scale)
  np.testing.assert_allclose(np.asarray(out.rows)[ri], np.asarray(want.rows), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.cols)[ci], np.asarray(want.cols), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(out.rows)[~np.asarray(rv)] == -np.inf)
  assert np.all(np.asarray(out.cols)[~np.asarray(cv)] == -np.inf)
  np.testing.assert_allclose(float(v), float(want_v), rtol=1e-6)
  gq, gk, gs = (np.asarray(g) for g in grads)
  np.testing.assert_allclose(gq[ri], np.asarray(want_g[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gk[ci], np.asarray(want_g[1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gs, np.asarray(want_g[2]), rtol=1e-5)
  assert np.all(gq[~np.asarray(rv)] == 0) and np.all(gk[~np.asarray(cv)] == 0)


@pytest.mark.parametrize("impl", ENGINES)
@pytest.mark.parametrize("with_positives", [False, True])
def test_sigmoid_sum_with_invalid_rows_and_columns_equals_the_unpadded_matrix(impl, with_positives,
                                                                              monkeypatch):
  monkeypatch.setattr(blockwise, "DEFAULT_TILE", 3)
  b, d = 10, 4
  q, k, rv, cv = _padded(10, b, b, d)
  positives = None
  if with_positives:
    positives = (jnp.asarray(np.arange(b) % 4, jnp.int32), jnp.asarray(np.arange(b) % 3, jnp.int32))

  def padded(q, k, scale, bias):
    out = ops.sigmoid_sum(q, k, scale=scale, bias=bias, positives=positives, impl=impl, row_valid=rv,
                          col_valid=cv)
    return jnp.sum(_weights(b, 0.0) * out), out

  ri, ci = np.flatnonzero(rv), np.flatnonzero(cv)
  ids = (jnp.arange(b), jnp.arange(b)) if positives is None else positives
  sub = (ids[0][ri], ids[1][ci])

  def unpadded(q_s, k_s, scale, bias):
    out = ops.sigmoid_sum(q_s, k_s, scale=scale, bias=bias, positives=sub, impl="dense")
    return jnp.sum(_weights(b, 0.0)[ri] * out), out

  args = (jnp.asarray(2.0), jnp.asarray(-1.5))
  (v, out), grads = jax.value_and_grad(padded, argnums=(0, 1, 2, 3), has_aux=True)(q, k, *args)
  (want_v, want), want_g = jax.value_and_grad(unpadded, argnums=(0, 1, 2, 3), has_aux=True)(q[ri], k[ci], *args)
  np.testing.assert_allclose(np.asarray(out)[ri], np.asarray(want), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(out)[~np.asarray(rv)] == 0)
  np.testing.assert_allclose(float(v), float(want_v), rtol=1e-6)
  gq, gk = np.asarray(grads[0]), np.asarray(grads[1])
  np.testing.assert_allclose(gq[ri], np.asarray(want_g[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gk[ci], np.asarray(want_g[1]), rtol=1e-5, atol=1e-6)
  for got_g, w in zip(grads[2:], want_g[2:]):  # scale, bias
    np.testing.assert_allclose(float(got_g), float(w), rtol=1e-5)
  assert np.all(gq[~np.asarray(rv)] == 0) and np.all(gk[~np.asarray(cv)] == 0)


def test_non_finite_padding_reaches_neither_results_nor_gradients():
  q, k, rv, cv = _padded(20, 6, 6, 3)
  q = q.at[1].set(jnp.nan)
  k = k.at[1].set(jnp.inf)
  f = lambda q, k: jnp.sum(ops.logsumexp(q, k, scale=2.0, row_valid=rv, col_valid=cv).rows[np.asarray(rv)]) + \
      jnp.sum(ops.sigmoid_sum(q, k, scale=2.0, bias=-1.0, row_valid=rv, col_valid=cv))
  value, (gq, gk) = jax.value_and_grad(f, argnums=(0, 1))(q, k)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(gq))) and np.all(np.isfinite(np.asarray(gk)))


def test_with_validity_reserved_ids():
  r, c = masks.with_validity((jnp.array([5, 5]), jnp.array([5, 5])), jnp.array([True, False]),
                             jnp.array([False, True]), 2, 2)
  assert r.tolist() == [5, masks.INVALID_ROW_ID] and c.tolist() == [masks.INVALID_COL_ID, 5]
  assert masks.INVALID_ROW_ID != masks.INVALID_COL_ID
  assert masks.with_validity(None, None, None, 2, 2) is None


@pytest.mark.parametrize("reduction", [ops.logsumexp, functools.partial(ops.sigmoid_sum, bias=0.0)])
@pytest.mark.parametrize("kwargs,error,match", [
    ({"row_valid": jnp.ones((3,), bool)}, ValueError, r"`row_valid` must have shape \(4,\)"),
    ({"col_valid": jnp.ones((4,), jnp.int32)}, TypeError, "`col_valid` must be a boolean array"),
])
def test_bad_validity_raises(reduction, kwargs, error, match):
  x = jnp.ones((4, 2))
  with pytest.raises(error, match=match):
    reduction(x, x, scale=1.0, **kwargs)


def _top1_reference(q, k, valid):
  """float64 NumPy: hit iff the positive beats every other valid candidate (argmax with a unique max)."""
  s = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T
  s = np.where(valid[:, None] & valid[None, :], s, -np.inf)
  rows = [valid[i] and np.argmax(s[i]) == i and np.sum(s[i] == s[i, i]) == 1 for i in range(len(s))]
  cols = [valid[j] and np.argmax(s[:, j]) == j and np.sum(s[:, j] == s[j, j]) == 1 for j in range(len(s))]
  return np.array(rows), np.array(cols)


def _top1_inputs(seed, b, d, noise=1.0):
  q = randn(seed, b, d)
  return jnp.asarray(q), jnp.asarray(q + noise * randn(seed + 1, b, d))


@pytest.mark.parametrize("b,tile", [(7, 3), (40, 16), (64, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_top1_matches_numpy_argmax(b, tile, masked):
  from jaxcl.ops import dense  # noqa: PLC0415

  q, k = _top1_inputs(30 + b, b, 5)
  valid = np.random.default_rng(b).random(b) < 0.7 if masked else np.ones(b, bool)
  want_rows, want_cols = _top1_reference(q, k, valid)
  assert 0 < want_rows.sum() < valid.sum()  # neither trivial
  got = ops.top1(q, k, row_valid=jnp.asarray(valid) if masked else None,
                 col_valid=jnp.asarray(valid) if masked else None)
  np.testing.assert_array_equal(np.asarray(got.rows), want_rows)
  np.testing.assert_array_equal(np.asarray(got.cols), want_cols)
  ids = jnp.where(jnp.asarray(valid), jnp.arange(b), masks.INVALID_ROW_ID), jnp.where(
      jnp.asarray(valid), jnp.arange(b), masks.INVALID_COL_ID)
  include = masks.with_validity(None, jnp.asarray(valid), jnp.asarray(valid), b, b)
  tiled = blockwise.top1_scores(q, k, positives=ids, include=include, tile=tile)
  full = dense.top1_scores(q, k, positives=ids, include=include)
  for x, y in zip(tiled, full):  # the tiles' matmuls may round differently from the full one
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_top1_ties_are_misses():
  q = jnp.ones((4, 3))
  got = ops.top1(q, q)
  assert not np.any(np.asarray(got.rows)) and not np.any(np.asarray(got.cols))
  assert np.all(np.asarray(ops.top1(jnp.eye(3), jnp.eye(3)).rows))


def test_top1_checks_impl():
  q = jnp.eye(3)
  with pytest.raises(ValueError, match=r"`impl` must be one of .*got 'blockwize'"):
    ops.top1(q, q, impl="blockwize")
  with pytest.raises(ValueError, match=r"`impl='ring'` is a sharded engine: it needs `axis_name`"):
    ops.top1(q, q, impl="ring")
  np.testing.assert_array_equal(ops.top1(q, q, impl="blockwise").rows, ops.top1(q, q, impl="dense").rows)


# ----------------------------------------------------------- impl="auto": by the platform compiled for
_KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _auto_objective(impl):
  def f(q, k, scale):
    out = ops.logsumexp(q, k, scale=scale, rows=True, cols=True, impl=impl)
    positives = (jnp.arange(q.shape[0]) % k.shape[0], jnp.arange(k.shape[0]))
    sig = ops.sigmoid_sum(q, k, scale=scale, bias=-1.0, positives=positives, impl=impl)
    return jnp.sum(_weights(q.shape[0], 0.1) * (out.rows + sig)) + jnp.sum(_weights(k.shape[0], 0.7) * out.cols)
  return f


def test_engine_settings_as_impl():
  """`impl=` takes an engine name or an engine's settings (`pallas.Settings`: the pallas engine with
  them), told apart by `engines.name_of` for every rule that depends on the engine."""
  s = pallas.Settings(flavour="gpu", interpret=True, block_rows=16)
  assert engines.name_of(s) == "pallas" and ops.resolve_impl(s, 8, 8) is s
  assert not engines.is_dense(s, 8, 8) and engines.is_dense("auto", 8, 8)
  with pytest.raises(ValueError,
                     match=r"^`impl=Settings\(flavour='gpu'.*\(the pallas engine\) cannot compute a term"):
    engines.twice_differentiable(s, 8, 8, "a term")
  with pytest.raises(TypeError, match=r"^`local_impl` must be an engine name or engine settings .*got 3\.$"):
    engines.name_of(3, "local_impl")
  q, k = jnp.asarray(randn(5, 6, 4)), jnp.asarray(randn(6, 7, 4))
  top = ops.top1(q, q, impl=s)  # validated, then the dense / blockwise max as for any engine
  assert top.rows.tolist() == ops.top1(q, q, impl="dense").rows.tolist()
  got = ops.logsumexp(q, k, scale=1.5, cols=True, impl=s)
  want = ops.logsumexp(q, k, scale=1.5, cols=True, impl="dense")
  np.testing.assert_allclose(got.rows, want.rows, rtol=1e-5)
  np.testing.assert_allclose(got.cols, want.cols, rtol=1e-5)


def test_auto_above_the_dense_size_compiles_kernels_for_tpu_and_gpu_and_blockwise_elsewhere(monkeypatch):
  """Above DENSE_MAX_ELEMENTS, "auto" is decided when the program is lowered: the fused kernels for
  TPU (Mosaic) and CUDA (Triton), the blockwise engine for this CPU (no Pallas kernel, not even in
  interpret mode), whatever `jax.default_backend()` is. Values and gradients equal the dense engine."""
  from jaxcl.ops import engines  # noqa: PLC0415

  monkeypatch.setattr(engines, "DENSE_MAX_ELEMENTS", 64)
  assert ops.resolve_impl("auto", 24, 20) == ops.BY_PLATFORM
  q, k = jnp.asarray(randn(70, 24, 8)), jnp.asarray(randn(71, 20, 8))
  scale = jnp.asarray(1.5 + np.random.default_rng(72).random(24), jnp.float32)
  grad = jax.jit(jax.value_and_grad(_auto_objective("auto"), argnums=(0, 1, 2)))
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, scale)]
  for platform in ("tpu", "cuda", "cpu"):
    mlir = jax.export.export(grad, platforms=[platform], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(t) for t in _KERNEL_CALLS.values()])(*args).mlir_module()
    counts = {p: mlir.count(f"@{t}") for p, t in _KERNEL_CALLS.items()}
    # per family: forward (log-sum-exp rows + columns: one call on TPU, two on GPU), then one fused
    # backward (`Settings.fused_backward`, both flavours)
    want = {"tpu": {"tpu": 4, "cuda": 0}, "cuda": {"tpu": 0, "cuda": 5}, "cpu": {"tpu": 0, "cuda": 0}}
    assert counts == want[platform], (platform, counts)
  assert "pallas_call" not in grad.lower(q, k, scale).as_text(debug_info=True)  # not interpret mode
  (v, g), (wv, wg) = grad(q, k, scale), jax.jit(jax.value_and_grad(_auto_objective("dense"), (0, 1, 2)))(q, k, scale)
  np.testing.assert_allclose(float(v), float(wv), rtol=1e-5)
  for x, y in zip(g, wg):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kernels", [("v5e:2x2", {"mosaic": 2, "triton": 0}),
                                           ("h200:1x1x1", {"mosaic": 0, "triton": 3})])
def test_auto_compiled_for_one_accelerator_uses_its_kernels(name, kernels):
  """CLIP forward and backward at the default impl, (16,384, 256) bf16 on one device, compiled here
  (`jaxcl.targets`, nothing runs) for a TPU v5e chip: the Mosaic kernels (fused row + column forward,
  the fused backward); for an H200: the Triton kernels (row and column forward, the fused backward). No (B, B)
  buffer: the temporaries stay far below the 1 GiB of a (B, B) float32 matrix."""
  from jaxcl import losses, targets  # noqa: PLC0415

  device = targets.get(name).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = jax.ShapeDtypeStruct((16384, 256), jnp.bfloat16, sharding=sharding)
  loss = lambda a, b: losses.clip(a, b, logit_scale=10.0)
  # conftest sets "highest" matmul precision, with which Mosaic refuses a bf16 x bf16 dot ("Bad lhs
  # type"); compile with the default precision, as a TPU program normally is.
  with jax.default_matmul_precision("default"):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
  assert targets.kernel_calls(compiled) == kernels
  assert targets.memory(compiled).temp_bytes < 64 * 2**20


def test_auto_inside_shard_map_runs_by_platform(monkeypatch):
  """Per-device losses inside the user's shard_map (no axis_name): above the dense size auto is the
  by-platform engine there too: here (CPU) the blockwise tiles, with the dense engine's values, and
  compiled for a TPU slice the Mosaic kernels on each chip's block."""
  from jaxcl import targets  # noqa: PLC0415
  from jaxcl.ops import engines  # noqa: PLC0415

  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])

  def per_device(impl, mesh):
    def f(q, k):
      return ops.logsumexp(q, k, scale=2.0, cols=True, impl=impl).rows
    return jax.shard_map(f, mesh=mesh, in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P("data"))

  with monkeypatch.context() as patch:
    patch.setattr(engines, "DENSE_MAX_ELEMENTS", 16)
    assert ops.resolve_impl("auto", 8, 8) == ops.BY_PLATFORM
    q, k = jnp.asarray(randn(80, 16, 4)), jnp.asarray(randn(81, 16, 4))
    np.testing.assert_allclose(jax.jit(per_device("auto", mesh))(q, k), jax.jit(per_device("dense", mesh))(q, k),
                               rtol=1e-5)

  tpu = targets.mesh(targets.get("v5e:2x2"))
  spec = jax.ShapeDtypeStruct((4 * 8192, 128), jnp.bfloat16, sharding=jax.NamedSharding(tpu, jax.P("data")))
  with jax.default_matmul_precision("default"):
    compiled = jax.jit(per_device("auto", tpu)).lower(spec, spec).compile()
  assert targets.kernel_calls(compiled) == {"mosaic": 1, "triton": 0}  # rows and columns in one pass


# ----------------------------------------------------------------------------------- nearest neighbour
def _nearest_reference(q, k):
  """(index, score) of each row's largest <q_i, k_j> in float64, the smallest j on ties."""
  s = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T
  index = np.argmax(s, axis=1)
  return index, s[np.arange(len(q)), index]


@pytest.mark.parametrize("impl,n_keys,tile", [("dense", 37, None), ("blockwise", 37, 8), ("blockwise", 40, 8),
                                              ("pallas", 37, None)])
def test_nearest_equals_the_float64_argmax(impl, n_keys, tile):
  q, k = randn(0, 9, 6), randn(1, n_keys, 6)
  want_index, want_score = _nearest_reference(q, k)
  if tile is None:
    got = ops.nearest(q, k, impl=impl)
  else:  # several tiles, the last one slid back over columns already seen when 8 does not divide n_keys
    got = ops.Nearest(*blockwise.nearest(jnp.asarray(q), jnp.asarray(k), tile=tile))
  np.testing.assert_array_equal(np.asarray(got.index), want_index)
  np.testing.assert_allclose(np.asarray(got.score), want_score, rtol=1e-6)
  assert got.index.dtype == jnp.int32 and got.score.dtype == jnp.float32


def test_nearest_ties_go_to_the_first_key_in_every_engine():
  """Key rows 3, 11 and 19 are equal (the nearest for every query): every engine returns 3, whichever
  tile holds each copy."""
  q, k = np.abs(randn(2, 5, 4)), randn(3, 24, 4) * 0.01
  k[[3, 11, 19]] = 10.0
  for got in (ops.nearest(q, k, impl="dense").index, ops.nearest(q, k, impl="blockwise").index,
              blockwise.nearest(jnp.asarray(q), jnp.asarray(k), tile=8)[0],
              blockwise.nearest(jnp.asarray(q), jnp.asarray(k), tile=7)[0]):
    np.testing.assert_array_equal(np.asarray(got), np.full(5, 3))


def test_nearest_a_tie_in_the_slid_back_last_tile_keeps_the_first_key():
  """37 keys in tiles of 8: the last tile starts at 29 and sees 29-31 again. Equal best keys at 30 (tile
  3, and again in the last tile) and 34 (the last tile only): 30, as the dense argmax says."""
  q, k = np.abs(randn(4, 3, 4)), randn(5, 37, 4) * 0.01
  k[[30, 34]] = 10.0
  assert blockwise.tile_size(8, 37, 4) == 8
  got = blockwise.nearest(jnp.asarray(q), jnp.asarray(k), tile=8)[0]
  np.testing.assert_array_equal(np.asarray(got), np.full(3, 30))
  np.testing.assert_array_equal(np.asarray(ops.nearest(q, k, impl="dense").index), np.full(3, 30))


def test_nearest_auto_searches_by_tiles_above_the_dense_size(monkeypatch):
  q, k = randn(4, 12, 5), randn(5, 50, 5)
  monkeypatch.setattr(engines, "DENSE_MAX_ELEMENTS", 10)
  np.testing.assert_array_equal(np.asarray(ops.nearest(q, k).index), _nearest_reference(q, k)[0])


def test_nearest_has_no_gradient():
  q, k = jnp.asarray(randn(6, 4, 3)), jnp.asarray(randn(7, 9, 3))
  gq, gk = jax.grad(lambda q, k: jnp.sum(ops.nearest(q, k, impl="blockwise").score), argnums=(0, 1))(q, k)
  assert not np.any(np.asarray(gq)) and not np.any(np.asarray(gk))


def test_nearest_errors_name_the_argument():
  with pytest.raises(ValueError, match="`k` must hold at least one key"):
    ops.nearest(np.ones((2, 3), np.float32), np.ones((0, 3), np.float32))
  with pytest.raises(ValueError, match="same feature size"):
    ops.nearest(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))
  with pytest.raises(ValueError, match="sharded engine"):
    ops.nearest(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), impl="ring")
