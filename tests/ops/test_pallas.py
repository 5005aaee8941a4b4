"""The `pallas` engine: Mosaic (TPU) and Triton (GPU) kernels against the dense engine and float64 NumPy.

On CPU the kernels run in Pallas interpret mode (both flavours), a few cases in TPU interpret mode
(`pltpu.InterpretParams()`: TPU memory semantics, uninitialised buffers filled with NaN), and the
gradients are lowered for real TPUs (Mosaic) and GPUs (Triton) with `jax.export`, which enforces the
block-shape rules and the kernels' lowerability without the hardware.
"""

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl.ops.pallas as engine
from jaxcl import losses
from jaxcl import ops
from jaxcl.ops import dense
from tests.losses import reference
from tests.helpers import assert_value_and_grads, randn

FLAVOURS = ["tpu", "gpu"]

# (Bq, Bk, D, block_rows, block_cols) per flavour: one block; several blocks with padding on both axes
# (B not a multiple of the block, Bq != Bk); several blocks with one axis exact.
SHAPES = {
    "tpu": [(8, 8, 4, None, None), (200, 130, 20, 128, 128), (136, 256, 8, 128, 128)],
    "gpu": [(8, 8, 4, None, None), (50, 37, 20, 16, 32), (64, 48, 24, 32, 16)],
}
CASES = [(f, *shape) for f in FLAVOURS for shape in SHAPES[f]]
CASE_IDS = [f"{f}-{bq}x{bk}x{d}-b{br}x{bc}" for f, bq, bk, d, br, bc in CASES]

# (rows, cols, exclude, include, per-row scale): every code path of the log-sum-exp kernels, all of
# them on the multi-block shape with padding on both axes, the most general one on a single block.
LSE_MODES = {
    "rows": (True, False, False, False, False),
    "both-exclude-perrow": (True, True, True, False, True),
    "cols-include": (False, True, False, True, False),
    "both-exclude-include-perrow": (True, True, True, True, True),
}
_LSE_PER_SHAPE = [("both-exclude-include-perrow",), tuple(LSE_MODES),
                  ("cols-include", "both-exclude-perrow")]
LSE_CASES = [
    pytest.param(*case, LSE_MODES[mode], id=f"{case_id}-{mode}")
    for n, (case, case_id) in enumerate(zip(CASES, CASE_IDS))
    for mode in _LSE_PER_SHAPE[n % 3]
]
# (per-row scale, positives on the diagonal) for the sigmoid kernels, spread the same way.
SIG_MODES = {"scalar-diag": (False, True), "perrow-ids": (True, False)}
_SIG_PER_SHAPE = [("scalar-diag",), ("perrow-ids",), ("scalar-diag",)]
SIG_CASES = [
    pytest.param(*case, *SIG_MODES[mode], id=f"{case_id}-{mode}")
    for n, (case, case_id) in enumerate(zip(CASES, CASE_IDS))
    for mode in _SIG_PER_SHAPE[n % 3]
]


def _settings(flavour, block_rows=None, block_cols=None, **extra):
  """Interpret-mode settings of `flavour` (a static argument: no process state)."""
  return engine.Settings(flavour=flavour, interpret=True, block_rows=block_rows, block_cols=block_cols,
                         **extra)


def _lse(settings):
  return functools.partial(engine.logsumexp, settings=settings)


def _sig(settings):
  return functools.partial(engine.sigmoid_sum, settings=settings)


def _masks(bq, bk, exclude, include):
  ex = (jnp.arange(bq) % 5, jnp.arange(bk) % 5) if exclude else None
  inc = (jnp.arange(bq) % 3, jnp.arange(bk) % 3) if include else None
  return ex, inc


def _lse_objective(impl, bq, bk, rows, cols, exclude, include):
  """Σ_i w_i row_i + Σ_j u_j col_j (uneven weights, so every upstream gradient entry differs)."""
  w, u = jnp.linspace(0.5, 1.5, bq), jnp.linspace(1.5, -0.5, bk)

  def objective(q, k, scale):
    row, col = impl(q, k, scale=scale, rows=rows, cols=cols, exclude=exclude, include=include)
    total = 0.0
    if rows:
      total += jnp.sum(w * jnp.where(jnp.isfinite(row), row, 0.0))
    if cols:
      total += jnp.sum(u * jnp.where(jnp.isfinite(col), col, 0.0))
    return total, (row, col)

  return objective


def _np_lse(q, k, scale, exclude, include, axis):
  s = np.reshape(np.asarray(scale, np.float64), (-1, 1)) * (np.float64(q) @ np.float64(k).T)
  valid = np.ones(s.shape, bool)
  if exclude is not None:
    valid &= np.asarray(exclude[0])[:, None] != np.asarray(exclude[1])[None, :]
  if include is not None:
    valid &= np.asarray(include[0])[:, None] == np.asarray(include[1])[None, :]
  s = np.where(valid, s, -np.inf)
  m = np.max(s, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  total = np.sum(np.exp(s - m), axis=axis)
  with np.errstate(divide="ignore"):
    return np.log(total) + np.squeeze(m, axis)


def _assert_grads_close(got, want, rtol=1e-4):
  for n, (g, w) in enumerate(zip(got, want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = np.max(np.abs(w)) + 1e-12
    np.testing.assert_allclose(g / scale, w / scale, rtol=rtol, atol=rtol, err_msg=f"gradient {n}")


def _run(fn, *args):
  return _compiled(jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True), *args)(*args)


def _compiled(fn, *args):
  # The interpret-mode kernels run in milliseconds; XLA's CPU optimisations would cost most of the test
  # time, so compile without them.
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------------------------- log-sum-exp
@pytest.mark.parametrize("flavour,bq,bk,d,block_rows,block_cols,mode", LSE_CASES)
def test_logsumexp_matches_dense_and_numpy(flavour, bq, bk, d, block_rows, block_cols, mode):
  rows, cols, use_exclude, use_include, per_row = mode
  q, k = randn(1, bq, d), randn(2, bk, d)
  scale = np.random.default_rng(3).uniform(0.5, 2.0, bq).astype(np.float32) if per_row else np.float32(1.7)
  exclude, include = _masks(bq, bk, use_exclude, use_include)
  (_, (row, col)), grads = _run(
      _lse_objective(_lse(_settings(flavour, block_rows, block_cols)), bq, bk, rows, cols, exclude, include),
      q, k, scale)
  (_, (d_row, d_col)), d_grads = _run(_lse_objective(dense.logsumexp, bq, bk, rows, cols, exclude, include),
                                      q, k, scale)
  for got, want, axis, on in ((row, d_row, 1, rows), (col, d_col, 0, cols)):
    if not on:
      assert got is None
      continue
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _np_lse(q, k, scale, exclude, include, axis), rtol=1e-5, atol=1e-5)
  _assert_grads_close(grads, d_grads)
  assert grads[2].shape == np.shape(scale)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_logsumexp_gradients_match_finite_differences(flavour):
  # Independent of the dense engine: float64 NumPy with central differences in q, k and the scale.
  bq, bk = 5, 3
  exclude = (jnp.arange(bq) % 3, jnp.arange(bk))
  w, u = np.linspace(0.5, 1.5, bq), np.linspace(1.5, -0.5, bk)

  def jax_loss(q, k, scale):
    row, col = engine.logsumexp(q, k, scale=scale, rows=True, cols=True, exclude=exclude, include=None,
                                settings=_settings(flavour))
    return jnp.sum(w * row) + jnp.sum(u * col)

  def np_loss(q, k, scale):
    return (w @ _np_lse(q, k, scale, exclude, None, 1)) + (u @ _np_lse(q, k, scale, exclude, None, 0))

  assert_value_and_grads(
      jax_loss, np_loss, [randn(4, bq, 3), randn(5, bk, 3), np.float32([0.7, 1.1, 1.9, 0.4, 1.3])]
  )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rows_with_nothing_valid_are_minus_inf_with_zero_gradient(flavour):
  # include ids: rows 0 and 3 (id 7) match no column; column 2 (id 9) matches no row.
  bq, bk = 6, 5
  include = (jnp.array([7, 0, 1, 7, 1, 0]), jnp.array([0, 1, 9, 1, 0]))
  q, k = randn(6, bq, 4), randn(7, bk, 4)
  (_, (row, col)), grads = _run(_lse_objective(_lse(_settings(flavour)), bq, bk, True, True, None, include),
                                q, k, np.float32(2.0))
  (_, (d_row, d_col)), d_grads = _run(_lse_objective(dense.logsumexp, bq, bk, True, True, None, include),
                                      q, k, np.float32(2.0))
  assert np.all(np.isneginf(row[np.array([0, 3])])) and np.isneginf(col[2])
  np.testing.assert_allclose(row, d_row, rtol=1e-5)
  np.testing.assert_allclose(col, d_col, rtol=1e-5)
  assert np.all(grads[0][np.array([0, 3])] == 0) and np.all(grads[1][2] == 0)
  assert all(np.all(np.isfinite(g)) for g in grads)
  _assert_grads_close(grads, d_grads)


def test_unfused_column_pass_matches_fused():
  # max_fused_cols=0 forces the TPU column log-sum-exp into a second, swapped call (the GPU path).
  bq, bk, d = 200, 130, 8
  q, k = randn(8, bq, d), randn(9, bk, d)
  exclude, _ = _masks(bq, bk, True, False)
  objective = lambda settings: _lse_objective(_lse(settings), bq, bk, True, True, exclude, None)
  (_, unfused), g_unfused = _run(objective(_settings("tpu", 128, 128, max_fused_cols=0)), q, k, np.float32(3.0))
  (_, fused), g_fused = _run(objective(_settings("tpu", 128, 128)), q, k, np.float32(3.0))
  for a, b in zip(unfused, fused):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  _assert_grads_close(g_unfused, g_fused, rtol=1e-5)
  # The forward really is one kernel call when fused and two otherwise.
  for max_fused_cols, calls in ((0, 2), (10**6, 1)):
    fn = objective(_settings("tpu", 128, 128, max_fused_cols=max_fused_cols))
    jaxpr = jax.make_jaxpr(lambda q, k: fn(q, k, 3.0)[0])(q, k)  # noqa: B023
    assert str(jaxpr).count("pallas_call[") == calls


# ------------------------------------------------------------------------- the fused TPU backward
def _np_lse_objective_grads(q, k, scale, exclude, include, w, u):
  """float64 (dq, dk, dscale) of Σ_i w_i row_i + Σ_j u_j col_j (w or u None: that term left out),
  with dS_ij = V_ij (w_i e^{S_ij − row_i} + u_j e^{S_ij − col_j}); dscale summed for a scalar scale."""
  q64, k64 = np.float64(q), np.float64(k)
  scale64 = np.broadcast_to(np.float64(scale), (q.shape[0],))[:, None]
  dots = q64 @ k64.T
  s = scale64 * dots
  ds = np.zeros_like(s)
  for weights, axis in ((w, 1), (u, 0)):
    if weights is not None:
      lse = np.expand_dims(_np_lse(q, k, scale, exclude, include, axis), axis)
      ds += np.expand_dims(np.float64(weights), axis) * np.exp(s - lse)
  valid = np.isfinite(_np_lse_valid_scores(s, exclude, include))
  ds = np.where(valid, ds, 0.0)
  dscale = np.sum(ds * dots, axis=1)
  return scale64 * ds @ k64, (scale64 * ds).T @ q64, dscale if np.ndim(scale) else np.sum(dscale)


def _np_lse_valid_scores(s, exclude, include):
  valid = np.ones(s.shape, bool)
  for pair, keep in ((exclude, np.not_equal), (include, np.equal)):
    if pair is not None:
      valid &= keep(np.asarray(pair[0])[:, None], np.asarray(pair[1])[None, :])
  return np.where(valid, s, -np.inf)


def _rows_per_call(settings, bq, bk, d, dtype):
  """The rows of one fused backward call of these settings (`pallas_tpu.fused_layout`)."""
  from jaxcl.ops import pallas_tpu

  plan = engine._make_plan(settings, "tpu", True, bq, bk, d)
  return pallas_tpu.fused_layout(plan.tiles, plan.padded_d, jnp.dtype(dtype).itemsize,
                                 settings.fused_backward_vmem)[1]


# (rows, cols, exclude, include, per-row scale) as in LSE_MODES; 300 rows in 3 blocks of 128 (84 padded)
# against 190 columns in 2 (66 padded). `fused_backward_vmem` 1: one row block per call (3 calls);
# 1,376,256 bytes: two blocks (2 calls, the second past the last block: skipped).
FUSED_CASES = [
    pytest.param("rows", jnp.float32, 1, id="rows-f32-3calls"),
    pytest.param("cols-include", jnp.float32, 1_376_256, id="cols-include-f32-2calls-overhang"),
    pytest.param("both-exclude-perrow", jnp.float32, 1_376_256, id="both-exclude-perrow-f32-2calls-overhang"),
    pytest.param("both-exclude-include-perrow", jnp.bfloat16, 1, id="both-exclude-include-perrow-bf16-3calls"),
]


@pytest.mark.parametrize("mode, dtype, vmem", FUSED_CASES)
def test_fused_backward_matches_unfused_dense_and_numpy(mode, dtype, vmem):
  """`Settings.fused_backward` (the default on TPU): one kernel recomputing each tile of S once for dq
  and dk, its rows split into calls of one kernel in a loop, equals the dq + dk kernels, the dense
  engine and float64 numpy in q, k and the scale (scalar or per row), with every mask kind."""
  rows, cols, use_exclude, use_include, per_row = LSE_MODES[mode]
  bq, bk, d = 300, 190, 20
  q, k = (jnp.asarray(randn(s, n, d), dtype) for s, n in ((60, bq), (61, bk)))
  scale = np.random.default_rng(62).uniform(0.5, 2.0, bq).astype(np.float32) if per_row else np.float32(1.7)
  exclude, include = _masks(bq, bk, use_exclude, use_include)
  fused = _settings("tpu", 128, 128, fused_backward_vmem=vmem)
  per_call = {1: 128, 1_376_256: 256}[vmem]
  assert _rows_per_call(fused, bq, bk, d, dtype) == per_call
  objective = lambda impl: _lse_objective(impl, bq, bk, rows, cols, exclude, include)
  (_, (row, col)), grads = _run(objective(_lse(fused)), q, k, scale)
  _, unfused = _run(objective(_lse(_settings("tpu", 128, 128, fused_backward=False))), q, k, scale)
  _, dense_grads = _run(objective(dense.logsumexp), q, k, scale)
  # The fused and the two kernels: the same sums in another order (bf16: dS rounded alike).
  _assert_grads_close(grads, unfused, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
  _assert_grads_close(grads, dense_grads, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  w, u = np.linspace(0.5, 1.5, bq), np.linspace(1.5, -0.5, bk)
  want = _np_lse_objective_grads(np.float32(q), np.float32(k), scale, exclude, include, w if rows else None,
                                 u if cols else None)
  _assert_grads_close(grads, want, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  assert grads[0].dtype == grads[1].dtype == dtype and grads[2].shape == np.shape(scale)
  # The backward is one kernel: a pallas_call in the loop over calls, or a single one.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda q, k: objective(_lse(fused))(q, k, scale)[0], (0, 1)))(q, k))
  assert jaxpr.count("pallas_call[") == 2  # the forward (one pass here) and the fused backward
  assert "scan[" in jaxpr  # the loop over calls (a fori_loop)


def _assert_scale_grads(dq, dscale, q, scale, want_g, n: int, name: str = ""):
  """The fused backward's epilogue: its (padded) dq and dscale are `engines.scale_grads` of the float64
  g (in float32), and float64 numpy's scale_i g_i and <q_i, g_i>; its padded rows are exact zeros."""
  from jaxcl.ops import engines

  want_dq, want_ds = np.float64(scale)[:, None] * want_g, np.sum(np.float64(q) * want_g, axis=1)
  formula = engines.scale_grads(jnp.asarray(q), jnp.asarray(scale), jnp.asarray(want_g, jnp.float32))
  for got, want in ((dq[:n, :q.shape[1]], want_dq), (dscale[:n], want_ds)):
    for ref in (want, np.float64(formula[0] if got.ndim == 2 else formula[1])):
      np.testing.assert_allclose(np.float64(got), ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref)), err_msg=name)
  assert dq.dtype == q.dtype and dscale.dtype == jnp.float32, name
  assert not np.any(dq[n:]) and not np.any(dscale[n:]), name  # padded rows: nothing leaks


def test_fused_backward_kernel_adds_into_the_accumulator_in_place():
  """`pallas_tpu.lse_backward_fused` with `acc`: (dq, acc + dk, dscale) against float64 numpy and
  `engines.scale_grads` of the g, across two calls (two row blocks per call, three blocks), the
  accumulator's buffer being dk's (`input_output_aliases`); padded rows of q and the scale hold junk,
  which reaches neither dk nor dscale."""
  from jaxcl.ops import pallas_tpu

  bq, bk, d = 300, 190, 20
  (q, k, scale, g_row, g_col, _, exclude, _, _, acc, (want_g, want_dk), _, (row, col)) = _block_grad_case(
      63, bq, bk, d)
  plan = engine._make_plan(_settings("tpu", 128, 128), "tpu", True, bq, bk, d, kinds=("exclude",), cols=True)
  t = plan.tiles
  pad = lambda x, *shape: jnp.pad(jnp.asarray(x), [(0, n - m) for n, m in zip(shape, np.shape(x))])
  ids = ((pad(exclude[0], t.padded_a), pad(exclude[1], t.padded_b)),)
  args = (pad(q, t.padded_a, 128).at[bq:, :d].set(7.0), pad(k, t.padded_b, 128),
          pad(scale, t.padded_a).at[bq:].set(3.0), ids, pad(np.float32(row), t.padded_a),
          pad(g_row, t.padded_a), pad(np.float32(col), t.padded_b), pad(g_col, t.padded_b))
  fn = lambda acc: pallas_tpu.lse_backward_fused(*args, kinds=plan.kinds, tiles=t, vmem=1_376_256, acc=acc)
  acc_p = pad(acc, t.padded_b, 128)
  jaxpr = str(jax.make_jaxpr(fn)(acc_p))
  assert "input_output_aliases=((" in jaxpr and "scan[" in jaxpr
  dq, dk, dscale = _compiled(fn, acc_p)(acc_p)
  want = np.float64(acc) + want_dk
  np.testing.assert_allclose(np.float64(dk[:bk, :d]), want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))
  assert not np.any(dk[bk:] - acc_p[bk:])  # padding: nothing added
  _assert_scale_grads(dq, dscale, q, scale, want_g, bq)


# ------------------------------------------------------------------------------------------ sigmoid
def _sig_objective(impl, bq, positives):
  w = jnp.linspace(1.5, 0.5, bq)

  def objective(q, k, scale, bias):
    out = impl(q, k, scale=scale, bias=bias, positives=positives)
    return jnp.sum(w * out), out

  return objective


@pytest.mark.parametrize("flavour,bq,bk,d,block_rows,block_cols,per_row,diagonal", SIG_CASES)
def test_sigmoid_sum_matches_dense(flavour, bq, bk, d, block_rows, block_cols, per_row, diagonal):
  if diagonal and bq != bk:
    bk = bq  # the diagonal needs a square matrix
  q, k = randn(10, bq, d), randn(11, bk, d)
  scale = np.random.default_rng(12).uniform(0.5, 3.0, bq).astype(np.float32) if per_row else np.float32(2.5)
  positives = None if diagonal else (jnp.arange(bq) % 4, jnp.arange(bk) % 4)
  args = (q, k, scale, np.float32(-1.5))
  (_, out), grads = _run(_sig_objective(_sig(_settings(flavour, block_rows, block_cols)), bq, positives), *args)
  (_, want), d_grads = _run(_sig_objective(dense.sigmoid_sum, bq, positives), *args)
  assert out.shape == (bq,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  _assert_grads_close(grads, d_grads)


def _np_sig_objective_grads(q, k, scale, bias, positives, w):
  """float64 (dq, dk, dscale, dbias) of Σ_i w_i Σ_j softplus(−z_ij (S_ij + bias)): dS = −w_i z σ(−z (S + b));
  dscale summed for a scalar scale, dbias for a scalar bias."""
  q64, k64 = np.float64(q), np.float64(k)
  scale64 = np.broadcast_to(np.float64(scale), (q.shape[0],))[:, None]
  dots = q64 @ k64.T
  z = np.where(np.asarray(positives[0])[:, None] == np.asarray(positives[1])[None, :], 1.0, -1.0)
  ds = -np.float64(w)[:, None] * z / (1.0 + np.exp(z * (scale64 * dots + np.float64(bias))))
  dscale = np.sum(ds * dots, axis=1)
  return (scale64 * ds @ k64, (scale64 * ds).T @ q64, dscale if np.ndim(scale) else np.sum(dscale),
          np.sum(ds))


@pytest.mark.parametrize("per_row, diagonal, dtype, vmem", [
    pytest.param(True, False, jnp.float32, 1_376_256, id="perrow-ids-f32-2calls-overhang"),
    pytest.param(False, True, jnp.float32, 1, id="scalar-diag-f32-3calls"),
    pytest.param(True, False, jnp.bfloat16, 1, id="perrow-ids-bf16-3calls"),
])
def test_fused_sigmoid_backward_matches_unfused_dense_and_numpy(per_row, diagonal, dtype, vmem):
  """The fused TPU backward of the sigmoid sum (`sigmoid_backward_fused`: g, dk and the row sums of dS
  for the bias from one recomputation of each tile) equals the dq + dk kernels, the dense engine and
  float64 numpy in q, k, the scale and the bias."""
  bq, bk, d = 300, 300 if diagonal else 190, 20
  q, k = (jnp.asarray(randn(s, n, d), dtype) for s, n in ((64, bq), (65, bk)))
  scale = np.random.default_rng(66).uniform(0.5, 2.0, bq).astype(np.float32) if per_row else np.float32(1.5)
  positives = (jnp.arange(bq), jnp.arange(bk)) if diagonal else (jnp.arange(bq) % 4, jnp.arange(bk) % 4)
  args = (q, k, scale, np.float32(-1.5))
  fused = _settings("tpu", 128, 128, fused_backward_vmem=vmem)
  per_call = _rows_per_call(fused, bq, bk, d, dtype)
  assert per_call == {1: 128, 1_376_256: 256}[vmem]
  objective = lambda impl: _sig_objective(impl, bq, None if diagonal else positives)
  (_, out), grads = _run(objective(_sig(fused)), *args)
  _, unfused = _run(objective(_sig(_settings("tpu", 128, 128, fused_backward=False))), *args)
  (_, want_out), dense_grads = _run(objective(dense.sigmoid_sum), *args)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-4)
  _assert_grads_close(grads, unfused, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
  _assert_grads_close(grads, dense_grads, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  want = _np_sig_objective_grads(np.float32(q), np.float32(k), scale, -1.5, positives, np.linspace(1.5, 0.5, bq))
  _assert_grads_close(grads, want, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: objective(_sig(fused))(*a)[0], (0, 1, 2, 3)))(*args))
  assert jaxpr.count("pallas_call[") == 2  # the forward and the fused backward
  assert "scan[" in jaxpr  # the loop over calls


# ------------------------------------------------------------------------- the fused GPU backward
# 50 rows in 4 blocks of 16 (14 padded) against 37 columns in 2 blocks of 32 (27 padded), D = 20 (padded
# to 32): the Triton kernels in interpret mode, the fused backward (the default) against the dq + dk
# kernels (`fused_backward=False`).
GPU_FUSED_BLOCKS = (16, 32)


def _gpu_backward_calls(fn, *args):
  """(pallas_calls, atomic adds) in the jaxpr of fn's gradient in all its arguments."""
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: fn(*a)[0], tuple(range(len(args)))))(*args))
  return jaxpr.count("pallas_call["), jaxpr.count("atomic_rmw[")


@pytest.mark.parametrize("mode, dtype", [
    pytest.param("rows", jnp.float32, id="rows-f32"),
    pytest.param("cols-include", jnp.float32, id="cols-include-f32"),
    pytest.param("both-exclude-perrow", jnp.float32, id="both-exclude-perrow-f32"),
    pytest.param("both-exclude-include-perrow", jnp.bfloat16, id="both-exclude-include-perrow-bf16"),
])
def test_gpu_fused_backward_matches_two_kernels_dense_and_numpy(mode, dtype):
  """`Settings.fused_backward` on GPU (the default): one Triton kernel per row block recomputes each
  tile once for g (in registers) and dk (float32 atomics into a (Bk, D) buffer); it equals the dq + dk
  kernels, the dense engine and float64 numpy in q, k and the scale (scalar or per row), with every
  mask kind and padding on both axes."""
  rows, cols, use_exclude, use_include, per_row = LSE_MODES[mode]
  bq, bk, d = 50, 37, 20
  q, k = (jnp.asarray(randn(s, n, d), dtype) for s, n in ((70, bq), (71, bk)))
  scale = np.random.default_rng(72).uniform(0.5, 2.0, bq).astype(np.float32) if per_row else np.float32(1.7)
  exclude, include = _masks(bq, bk, use_exclude, use_include)
  objective = lambda impl: _lse_objective(impl, bq, bk, rows, cols, exclude, include)
  fused = objective(_lse(_settings("gpu", *GPU_FUSED_BLOCKS)))
  two = objective(_lse(_settings("gpu", *GPU_FUSED_BLOCKS, fused_backward=False)))
  (_, lses), grads = _run(fused, q, k, scale)
  (_, two_lses), two_grads = _run(two, q, k, scale)
  _, dense_grads = _run(objective(dense.logsumexp), q, k, scale)
  for got, want in zip(lses, two_lses):  # the same forward kernels
    assert (got is None and want is None) or np.array_equal(got, want)
  # The same sums in another order (bf16: dS rounded alike).
  _assert_grads_close(grads, two_grads, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
  _assert_grads_close(grads, dense_grads, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  w, u = np.linspace(0.5, 1.5, bq), np.linspace(1.5, -0.5, bk)
  want = _np_lse_objective_grads(np.float32(q), np.float32(k), scale, exclude, include, w if rows else None,
                                 u if cols else None)
  _assert_grads_close(grads, want, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  assert grads[0].dtype == grads[1].dtype == dtype and grads[2].shape == np.shape(scale)
  # The forward (a row and / or a column pass) and ONE backward kernel, which adds dk by atomics;
  # fused_backward=False: a dq and a dk kernel, no atomics.
  forward = int(rows) + int(cols)
  assert _gpu_backward_calls(fused, q, k, scale) == (forward + 1, 1)
  assert _gpu_backward_calls(two, q, k, scale) == (forward + 2, 0)


@pytest.mark.parametrize("per_row, diagonal, dtype", [
    pytest.param(True, False, jnp.float32, id="perrow-ids-f32"),
    pytest.param(False, True, jnp.float32, id="scalar-diag-f32"),
    pytest.param(True, False, jnp.bfloat16, id="perrow-ids-bf16"),
])
def test_gpu_fused_sigmoid_backward_matches_two_kernels_dense_and_numpy(per_row, diagonal, dtype):
  """The fused GPU backward of the sigmoid sum (g, dk by atomics and the row sums of dS for the bias
  from one recomputation of each tile) equals the dq + dk kernels, the dense engine and float64 numpy
  in q, k, the scale and the bias."""
  bq, bk, d = 50, 50 if diagonal else 37, 20
  q, k = (jnp.asarray(randn(s, n, d), dtype) for s, n in ((73, bq), (74, bk)))
  scale = np.random.default_rng(75).uniform(0.5, 2.0, bq).astype(np.float32) if per_row else np.float32(1.5)
  positives = (jnp.arange(bq), jnp.arange(bk)) if diagonal else (jnp.arange(bq) % 4, jnp.arange(bk) % 4)
  args = (q, k, scale, np.float32(-1.5))
  objective = lambda impl: _sig_objective(impl, bq, None if diagonal else positives)
  fused = objective(_sig(_settings("gpu", *GPU_FUSED_BLOCKS)))
  two = objective(_sig(_settings("gpu", *GPU_FUSED_BLOCKS, fused_backward=False)))
  (_, out), grads = _run(fused, *args)
  (_, two_out), two_grads = _run(two, *args)
  _, dense_grads = _run(objective(dense.sigmoid_sum), *args)
  assert np.array_equal(out, two_out)
  _assert_grads_close(grads, two_grads, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
  _assert_grads_close(grads, dense_grads, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  want = _np_sig_objective_grads(np.float32(q), np.float32(k), scale, -1.5, positives, np.linspace(1.5, 0.5, bq))
  _assert_grads_close(grads, want, rtol=1e-4 if dtype == jnp.float32 else 2e-2)
  assert _gpu_backward_calls(fused, *args) == (2, 1)  # the forward and the fused backward
  assert _gpu_backward_calls(two, *args) == (3, 0)


def test_gpu_fused_backward_kernels_add_into_the_accumulator_in_place():
  """`pallas_gpu.lse_backward_fused` and `sigmoid_backward_fused` with `acc`: (dq, acc + dk, dscale)
  (and the sigmoid's row sums of dS) against float64 numpy and `engines.scale_grads` of the g, the
  accumulator's buffer being dk's (`input_output_aliases`); its padded rows get nothing added, and the
  junk in the padded rows of q and the scale reaches neither dk nor dscale."""
  from jaxcl.ops import pallas_gpu

  bq, bk, d = 50, 37, 20
  (q, k, scale, g_row, g_col, g, exclude, positives, _, acc, (want_g, want_dk), (want_sg, want_sdk, want_db),
   (row, col)) = _block_grad_case(76, bq, bk, d)
  plan = engine._make_plan(_settings("gpu", *GPU_FUSED_BLOCKS), "gpu", True, bq, bk, d, kinds=("exclude",),
                           cols=True)
  t, dp = plan.tiles, plan.padded_d
  pad = lambda x, *shape: jnp.pad(jnp.asarray(x), [(0, n - m) for n, m in zip(shape, np.shape(x))])
  pair = lambda p: (pad(p[0], t.padded_a), pad(p[1], t.padded_b))
  q_p, k_p, scale_p = pad(q, t.padded_a, dp).at[bq:, :d].set(7.0), pad(k, t.padded_b, dp), pad(scale, t.padded_a)
  scale_p = scale_p.at[bq:].set(3.0)
  lse_args = (q_p, k_p, scale_p, (pair(exclude),), pad(np.float32(row), t.padded_a), pad(g_row, t.padded_a),
              pad(np.float32(col), t.padded_b), pad(g_col, t.padded_b))
  sig_args = (q_p, k_p, scale_p, jnp.full((t.padded_a,), -1.5), pair(positives), pad(g, t.padded_a))
  calls = {
      "lse": lambda acc: pallas_gpu.lse_backward_fused(*lse_args, kinds=plan.kinds, tiles=t, acc=acc),
      "sigmoid": lambda acc: pallas_gpu.sigmoid_backward_fused(*sig_args, tiles=t, acc=acc),
  }
  wants = {"lse": (want_g, want_dk), "sigmoid": (want_sg, want_sdk)}
  acc_p = pad(acc, t.padded_b, dp).at[bk:].set(7.0)  # padded rows: 7, to stay 7
  for name, fn in calls.items():
    assert "input_output_aliases=((" in str(jax.make_jaxpr(fn)(acc_p)), name
    outs = _compiled(fn, acc_p)(acc_p)
    want = np.float64(acc) + wants[name][1]
    np.testing.assert_allclose(np.float64(outs[1][:bk, :d]), want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)),
                               err_msg=name)
    assert np.all(outs[1][bk:] == 7.0), name  # padding: nothing added
    _assert_scale_grads(outs[0], outs[2], q, scale, wants[name][0], bq, name)
  np.testing.assert_allclose(float(jnp.sum(outs[3])), want_db, rtol=1e-4)  # the sigmoid's Σ_ij dS


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sigmoid_sum_gradients_match_finite_differences(flavour):
  bq, bk = 4, 6
  positives = (jnp.array([0, 1, 2, 0]), jnp.array([0, 0, 1, 3, 2, 2]))
  w = np.linspace(1.5, 0.5, bq)

  def jax_loss(q, k, scale, bias):
    return jnp.sum(w * engine.sigmoid_sum(q, k, scale=scale, bias=bias, positives=positives,
                                          settings=_settings(flavour)))

  def np_loss(q, k, scale, bias):
    s = np.reshape(scale, (-1, 1)) * (q @ k.T) + bias
    z = np.where(np.asarray(positives[0])[:, None] == np.asarray(positives[1])[None, :], 1.0, -1.0)
    return w @ np.sum(reference.common.softplus(-z * s), axis=1)

  assert_value_and_grads(
      jax_loss, np_loss,
      [randn(13, bq, 3), randn(14, bk, 3), np.float32([0.5, 2.0, 1.0, 3.0]), np.float32(-0.7)],
  )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_extreme_logits_are_finite(flavour):
  # Huge scale: S ~ ±1e4, far beyond exp's float32 range, in both families; q = k with the diagonal
  # excluded, so the largest logits of every row are the masked ones (exp would overflow if evaluated).
  q = randn(15, 20, 4)
  diagonal = (jnp.arange(20), jnp.arange(20))
  lse = lambda impl: _lse_objective(impl, 20, 20, True, True, diagonal, None)
  (_, (row, col)), g_lse = _run(lse(_lse(_settings(flavour))), q, q, np.float32(3e3))
  (_, sig), g_sig = _run(_sig_objective(_sig(_settings(flavour)), 20, None), q, q, np.float32(3e3),
                         np.float32(-10.0))
  (_, (d_row, _)), d_grads = _run(lse(dense.logsumexp), q, q, np.float32(3e3))
  np.testing.assert_allclose(row, d_row, rtol=1e-5)
  for x in (row, col, sig, *g_lse, *g_sig):
    assert np.all(np.isfinite(np.asarray(x)))
  _assert_grads_close(g_lse, d_grads)


# --------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bf16_inputs_accumulate_in_float32(flavour):
  bq, bk, d = 40, 24, 32
  q32, k32 = randn(17, bq, d), randn(18, bk, d)
  q16, k16 = jnp.asarray(q32, jnp.bfloat16), jnp.asarray(k32, jnp.bfloat16)
  exclude, _ = _masks(bq, bk, True, False)
  settings = _settings(flavour, 16, 16) if flavour == "gpu" else _settings(flavour)
  lse = _lse_objective(_lse(settings), bq, bk, True, True, exclude, None)
  lse_dense = _lse_objective(dense.logsumexp, bq, bk, True, True, exclude, None)
  sig = _sig_objective(_sig(settings), bq, (jnp.arange(bq) % 4, jnp.arange(bk) % 4))
  sig_dense = _sig_objective(dense.sigmoid_sum, bq, (jnp.arange(bq) % 4, jnp.arange(bk) % 4))
  (_, (row, col)), g_lse = _run(lse, q16, k16, np.float32(5.0))
  (_, out), g_sig = _run(sig, q16, k16, np.float32(5.0), np.float32(-2.0))
  (_, (row16, col16)), g_lse16 = _run(lse_dense, q16, k16, np.float32(5.0))
  (_, (row32, _)), _ = _run(lse_dense, q32, k32, np.float32(5.0))
  (_, out16), g_sig16 = _run(sig_dense, q16, k16, np.float32(5.0), np.float32(-2.0))
  assert row.dtype == col.dtype == out.dtype == jnp.float32
  # Same products, float32 accumulation: the dense bf16 engine to float32 rounding; float32 inputs to
  # the bf16 rounding of the inputs.
  np.testing.assert_allclose(row, row16, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(col, col16, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, out16, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(row, row32, rtol=3e-2)
  assert g_lse[0].dtype == g_lse[1].dtype == g_sig[1].dtype == jnp.bfloat16
  assert g_lse[2].dtype == g_sig[2].dtype == g_sig[3].dtype == jnp.float32
  # The backward kernels feed dS to the MXU in bf16 (as flash attention does): bf16-level agreement.
  _assert_grads_close(g_lse, g_lse16, rtol=2e-2)
  _assert_grads_close(g_sig, g_sig16, rtol=2e-2)


# ------------------------------------------------------------------------------ through the losses
LOSSES = {
    "clip": lambda a, b, t, impl: losses.clip(a, b, logit_scale=1.0 / t, impl=impl),
    "siglip": lambda a, b, t, impl: losses.siglip(a, b, logit_scale=1.0 / t, logit_bias=-3.0, impl=impl),
    "nt_xent": lambda a, b, t, impl: losses.nt_xent(a, b, temperature=t, impl=impl),
    "infonce_queue": lambda a, b, t, impl: losses.infonce(
        a, b, temperature=t, negatives=jnp.asarray(randn(19, 70, a.shape[1])), impl=impl
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_losses_with_impl_pallas_match_dense(flavour, name):
  # B = 150 > 128: several blocks with padding in both flavours; the temperature is differentiated too.
  fn = LOSSES[name]
  a, b = randn(20, 150, 12), randn(21, 150, 12)
  args = (a, b, np.float32(0.2))
  grad = lambda impl: _compiled(jax.value_and_grad(functools.partial(fn, impl=impl), argnums=(0, 1, 2)),
                                *args)(*args)
  blocks = (128, 128) if flavour == "tpu" else (32, 64)
  value, grads = grad(_settings(flavour, *blocks))  # impl=Settings: the pallas engine with them
  want, want_grads = grad("dense")
  np.testing.assert_allclose(value, want, rtol=1e-5)
  _assert_grads_close(grads, want_grads)


# ------------------------------------------------------------------ the ring's backward block functions
def _np_block_grads(q, k, scale, exclude, g_row, g_col, positives, g, bias):
  """float64 (g, dk) of one block for Σ g_row·row + Σ g_col·col (its own final log-sum-exps, returned
  too) and (g, dk, dbias) for Σ g·sig: the references of the dq / dk kernels' block functions."""
  q64, k64, scale64 = np.float64(q), np.float64(k), np.float64(scale)[:, None]
  s = scale64 * (q64 @ k64.T)
  row, col = (_np_lse(q, k, scale, exclude, None, axis) for axis in (1, 0))
  valid = np.asarray(exclude[0])[:, None] != np.asarray(exclude[1])[None, :]
  ds = np.where(valid, g_row[:, None] * np.exp(s - row[:, None]) + g_col[None, :] * np.exp(s - col[None, :]),
                0.0)
  z = np.where(np.asarray(positives[0])[:, None] == np.asarray(positives[1])[None, :], 1.0, -1.0)
  ds_sig = -g[:, None] * z / (1.0 + np.exp(z * (s + bias)))  # −g z σ(−z (S + b))
  lse = (ds @ k64, (scale64 * ds).T @ q64)
  sig = (ds_sig @ k64, (scale64 * ds_sig).T @ q64, np.sum(ds_sig))
  return lse, sig, (row, col)


def _block_grad_case(seed, bq, bk, d):
  """Inputs of the block gradient functions (q, k, per-row scale, cotangents, an exclude mask, sigmoid
  positives, two accumulators) from seeds seed .. seed + 4, and their float64 references
  (`_np_block_grads`, sigmoid bias -1.5)."""
  q, k = randn(seed, bq, d), randn(seed + 1, bk, d)
  rng = np.random.default_rng(seed + 2)
  scale = rng.uniform(0.5, 2.0, bq).astype(np.float32)
  g_row, g_col, g = (rng.uniform(-1.0, 1.0, n).astype(np.float32) for n in (bq, bk, bq))
  exclude = (jnp.arange(bq) % 5, jnp.arange(bk) % 5)
  positives = (jnp.arange(bq) % 4, jnp.arange(bk) % 4)
  acc_q, acc_k = randn(seed + 3, bq, d), randn(seed + 4, bk, d)
  lse_grads, sig_grads, lses = _np_block_grads(
      q, k, scale, exclude, np.float64(g_row), np.float64(g_col), positives, np.float64(g), -1.5)
  return q, k, scale, g_row, g_col, g, exclude, positives, acc_q, acc_k, lse_grads, sig_grads, lses


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("bq, bk, d, in_place", [(32, 64, 128, True), (5, 7, 3, False)],
                         ids=["tiles-exact-in-place", "padded-fresh-output"])
def test_block_grads_add_into_the_accumulator(flavour, bq, bk, d, in_place):
  """`lse_block_grad_q` / `_k` and `sigmoid_block_grad_q` / `_k` (the sharded ring's backward hops):
  acc + the dq kernel's g and acc + the dk kernel's dk against float64 numpy, from the final
  log-sum-exps; the kernel adds into the accumulator in place (its buffer aliased to the output) where
  the block needs no padding to the tiles, and returns a fresh output that is added otherwise."""
  (q, k, scale, g_row, g_col, g, exclude, positives, acc_q, acc_k, (want_g, want_dk),
   (want_sg, want_sdk, want_db), (row, col)) = _block_grad_case(40, bq, bk, d)
  lse_args = (q, k, scale, exclude, None, np.float32(row), g_row, np.float32(col), g_col)
  sig_args = (q, k, scale, np.float32(-1.5), positives, g)
  settings = _settings(flavour)
  calls = {
      "lse_q": (lambda acc: engine.lse_block_grad_q(*lse_args, acc, settings=settings), acc_q, want_g),
      "lse_k": (lambda acc: engine.lse_block_grad_k(*lse_args, acc, settings=settings), acc_k, want_dk),
      "sig_q": (lambda acc: engine.sigmoid_block_grad_q(*sig_args, acc, settings=settings)[0], acc_q, want_sg),
      "sig_k": (lambda acc: engine.sigmoid_block_grad_k(*sig_args, acc, settings=settings), acc_k, want_sdk),
  }
  for name, (fn, acc, want) in calls.items():
    assert ("input_output_aliases=((" in str(jax.make_jaxpr(fn)(acc))) == in_place, name
    got = np.float64(_compiled(fn, acc)(acc))
    want = np.float64(acc) + want
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)), err_msg=name)
  _, dbias = engine.sigmoid_block_grad_q(*sig_args, acc_q, settings=settings)
  np.testing.assert_allclose(float(dbias), want_db, rtol=1e-4)


@pytest.mark.parametrize("flavour, blocks, want_shape", [("tpu", (None, None), (32, 48, 128)),
                                                        ("gpu", (16, 32), (64, 64, 16))])
def test_blocks_padded_by_the_caller(flavour, blocks, want_shape):
  """`valid=(n_q, n_k)`: the block functions take q, k, their vectors, ids and accumulator already
  padded to `padded_shape` (as the sharded ring pads once for all its hops) and mask the padding by the
  true counts: the valid part equals float64 numpy, the accumulator is updated in place. Rows and
  columns share one padded length where that is a multiple of both blocks (the GPU case here), else
  each is padded to its own block (TPU: whole-axis blocks of 32 and 48 rows)."""
  bq, bk, d = 20, 37, 5
  settings = _settings(flavour, *blocks)
  rows, cols, dp = engine.padded_shape(settings, bq, bk, d)
  assert (rows, cols, dp) == want_shape
  (q, k, scale, g_row, g_col, g, exclude, positives, acc_q, acc_k, (want_g, want_dk),
   (want_sg, want_sdk, want_db), (row, col)) = _block_grad_case(50, bq, bk, d)
  pad = lambda x, *shape: jnp.pad(jnp.asarray(x), [(0, n - m) for n, m in zip(shape, np.shape(x))])
  ids = lambda pair: (pad(pair[0], rows), pad(pair[1], cols))
  q_p, k_p, scale_p = pad(q, rows, dp), pad(k, cols, dp), pad(scale, rows)
  lse_args = (q_p, k_p, scale_p, ids(exclude), None, pad(np.float32(row), rows), pad(g_row, rows),
              pad(np.float32(col), cols), pad(g_col, cols))
  sig_args = (q_p, k_p, scale_p, np.float32(-1.5), ids(positives), pad(g, rows))
  kw = dict(settings=settings, valid=(bq, bk))
  got_row, got_col = engine.lse_block(*lse_args[:5], rows=True, cols=True, **kw)
  np.testing.assert_allclose(got_row[:bq], row, rtol=1e-5)
  np.testing.assert_allclose(got_col[:bk], col, rtol=1e-5)
  calls = {
      "lse_q": (lambda acc: engine.lse_block_grad_q(*lse_args, acc, **kw), acc_q, rows, want_g),
      "lse_k": (lambda acc: engine.lse_block_grad_k(*lse_args, acc, **kw), acc_k, cols, want_dk),
      "sig_q": (lambda acc: engine.sigmoid_block_grad_q(*sig_args, acc, **kw)[0], acc_q, rows, want_sg),
      "sig_k": (lambda acc: engine.sigmoid_block_grad_k(*sig_args, acc, **kw), acc_k, cols, want_sdk),
  }
  for name, (fn, acc, n, want) in calls.items():
    acc_p = pad(acc, n, dp)
    assert "input_output_aliases=((" in str(jax.make_jaxpr(fn)(acc_p)), name
    got = np.float64(_compiled(fn, acc_p)(acc_p))[: acc.shape[0], :d]
    want = np.float64(acc) + want
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)), err_msg=name)
  _, dbias = engine.sigmoid_block_grad_q(*sig_args, pad(acc_q, rows, dp), **kw)
  np.testing.assert_allclose(float(dbias), want_db, rtol=1e-4)
  sig = engine.sigmoid_block(*sig_args[:5], **kw)
  assert sig.shape == (rows,)
  with pytest.raises(ValueError, match="`valid`"):
    engine.lse_block(q, k, scale, None, None, rows=True, cols=False, **kw)  # not padded
  with pytest.raises(ValueError, match="one flavour"):
    engine.padded_shape(engine.Settings(), bq, bk, d)


def test_engine_is_registered_and_reachable_through_ops():
  assert "pallas" in ops.available_impls()
  q, k = randn(22, 9, 5), randn(23, 7, 5)
  got = ops.logsumexp(q, k, scale=2.0, cols=True, impl="pallas")
  sig = ops.sigmoid_sum(q, k, scale=2.0, bias=1.0, positives=(jnp.arange(9) % 2, jnp.arange(7) % 2),
                        impl=_settings("gpu"))
  want = ops.logsumexp(q, k, scale=2.0, cols=True, impl="dense")
  np.testing.assert_allclose(got.rows, want.rows, rtol=1e-5)
  np.testing.assert_allclose(got.cols, want.cols, rtol=1e-5)
  np.testing.assert_allclose(
      sig, ops.sigmoid_sum(q, k, scale=2.0, bias=1.0, positives=(jnp.arange(9) % 2, jnp.arange(7) % 2),
                           impl="dense"), rtol=1e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_jit_of_vmap(flavour):
  a, b = randn(24, 3, 20, 8), randn(25, 3, 20, 8)
  def fn(impl):
    loss = lambda x, y: losses.clip(x, y, logit_scale=10.0, impl=impl)
    return _compiled(jax.vmap(jax.value_and_grad(loss)), a, b)

  value, grad = fn(_settings(flavour, *((16, 16) if flavour == "gpu" else (None, None))))(a, b)
  want, want_grad = fn("dense")(a, b)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_no_batch_by_batch_array_outside_the_kernels():
  # Memory O(B·D): no (Bq, Bk)-sized value anywhere in the traced forward + backward (kernel tiles are
  # 128 × 128 here, smaller than the 384 × 320 matrix).
  bq, bk = 384, 320

  def loss(q, k, s, settings):
    row, col = engine.logsumexp(q, k, scale=s, rows=True, cols=True, exclude=_masks(bq, bk, True, False)[0],
                                include=None, settings=settings)
    sig = engine.sigmoid_sum(q, k, scale=s, bias=0.5, positives=(jnp.arange(bq) % 7, jnp.arange(bk) % 7),
                             settings=settings)
    return jnp.sum(row) + jnp.sum(col) + jnp.sum(sig)

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        yield getattr(v.aval, "shape", ())
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  for flavour in FLAVOURS:
    grad = jax.grad(functools.partial(loss, settings=_settings(flavour, 128, 128)), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(jnp.zeros((bq, 8)), jnp.zeros((bk, 8)), jnp.float32(1.0))
    big = [s for s in shapes(jaxpr.jaxpr) if len(s) >= 2 and sorted(s)[-2] >= 256]
    assert not big, (flavour, big)
  # The check itself can fail: the dense engine does build the matrix.
  dense_loss = lambda q, k: jnp.sum(
      dense.logsumexp(q, k, scale=1.0, rows=True, cols=False, exclude=None, include=None)[0]
  )
  jaxpr = jax.make_jaxpr(jax.grad(dense_loss))(jnp.zeros((bq, 8)), jnp.zeros((bk, 8)))
  assert any(len(s) >= 2 and sorted(s)[-2] >= 256 for s in shapes(jaxpr.jaxpr))


# ------------------------------------------------------------------------- TPU semantics on CPU
@pytest.mark.parametrize("backward", [{"fused_backward": False}, {"fused_backward_vmem": 1}],
                         ids=["dq-dk-kernels", "fused-2calls"])
def test_tpu_interpret_mode_logsumexp_fused_rows_and_columns(backward):
  # TPU interpret mode: Mosaic block rules, VMEM scratch carried across the grid, uninitialised
  # buffers full of NaN. 2 × 2 grid of 128 × 128 tiles with padding on both axes; the fused backward
  # in two calls of one row block (its g block written back once per call, dk updated in place).
  bq, bk = 136, 130
  q, k = randn(26, bq, 6), randn(27, bk, 6)
  scale = np.random.default_rng(28).uniform(0.5, 2.0, bq).astype(np.float32)
  exclude, include = _masks(bq, bk, True, True)
  settings = engine.Settings(flavour="tpu", interpret="tpu", block_rows=128, block_cols=128, **backward)
  (_, (row, col)), grads = _run(_lse_objective(_lse(settings), bq, bk, True, True, exclude, include),
                                q, k, scale)
  (_, (d_row, d_col)), d_grads = _run(_lse_objective(dense.logsumexp, bq, bk, True, True, exclude, include),
                                      q, k, scale)
  np.testing.assert_allclose(row, d_row, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(col, d_col, rtol=1e-5, atol=1e-5)
  _assert_grads_close(grads, d_grads)


def test_tpu_interpret_mode_sigmoid_bf16():
  # bf16 rows pack 16 to a vreg: blocks of 144 rows (a multiple of 16) and 16-padded single blocks.
  bq = bk = 140
  q, k = (jnp.asarray(randn(s, bq, 16), jnp.bfloat16) for s in (29, 30))
  args = (q, k, np.float32(4.0), np.float32(-2.0))
  settings = engine.Settings(flavour="tpu", interpret="tpu", block_rows=None, block_cols=None)
  (_, out), grads = _run(_sig_objective(_sig(settings), bq, None), *args)
  (_, want), want_grads = _run(_sig_objective(dense.sigmoid_sum, bq, None), *args)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  _assert_grads_close(grads, want_grads, rtol=2e-2)


# --------------------------------------------------------------------------- lowering for hardware
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("flavour,platform,target,calls,extra", [
    ("tpu", "tpu", "tpu_custom_call", 3, {}),
    ("tpu", "tpu", "tpu_custom_call", 4, {"max_fused_cols": 0}),
    ("tpu", "tpu", "tpu_custom_call", 5, {"fused_backward": False}),
    ("tpu", "tpu", "tpu_custom_call", 3, {"fused_backward_vmem": 1}),
    ("gpu", "cuda", "__gpu$xla.gpu.triton", 4, {}),
    ("gpu", "cuda", "__gpu$xla.gpu.triton", 6, {"fused_backward": False}),
], ids=["mosaic", "mosaic-unfused-cols", "mosaic-dq-dk", "mosaic-fused-3calls", "triton", "triton-dq-dk"])
def test_gradients_lower_for_the_hardware(flavour, platform, target, calls, extra, dtype):
  # jax.export lowers for a platform this machine lacks: the Mosaic lowering checks the (8, 128) block
  # rules, the Triton lowering the power-of-two shapes and every op used in the kernels.
  settings = engine.Settings(flavour=flavour, interpret=False, block_rows=128, block_cols=128, **extra)

  def loss(q, k, s, b):
    diagonal = (jnp.arange(300), jnp.arange(300))
    row, col = engine.logsumexp(q, k, scale=s, rows=True, cols=True, exclude=diagonal, include=None,
                                settings=settings)
    return jnp.sum(row) + jnp.sum(col) + jnp.sum(
        engine.sigmoid_sum(q, k, scale=s, bias=b, positives=None, settings=settings))

  args = (jax.ShapeDtypeStruct((300, 96), dtype), jax.ShapeDtypeStruct((300, 96), dtype),
          jax.ShapeDtypeStruct((300,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
  )(*args)
  # TPU: fused forward (rows + columns) and one fused backward per family (in a loop of 3 calls of one
  # kernel with fused_backward_vmem=1); GPU: one fused backward per family (dk by atomics); a dq and a
  # dk kernel per family with fused_backward=False; GPU and max_fused_cols=0: the column pass is a
  # second call. The sigmoid forward is dead code in a gradient.
  assert exported.mlir_module().count(f"@{target}") == calls


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype, process_precision, want", [
    (jnp.float32, "default", jax.lax.Precision.HIGHEST),   # Triton would take DEFAULT as TF32
    (jnp.bfloat16, "highest", jax.lax.Precision.DEFAULT),  # Mosaic refuses bf16 at HIGHEST
], ids=["f32-under-default", "bf16-under-highest"])
def test_kernel_matmuls_ignore_the_process_precision(flavour, dtype, process_precision, want):
  # Every dot inside the forward and backward kernels has the precision of its input dtype, whatever
  # jax_default_matmul_precision says (the dots outside the kernels follow it).
  settings = engine.Settings(flavour=flavour, interpret=False)

  def loss(q, k):
    row, col = engine.logsumexp(q, k, scale=jnp.ones(()), rows=True, cols=True, exclude=None, include=None,
                                settings=settings)
    return jnp.sum(row) + jnp.sum(col) + jnp.sum(
        engine.sigmoid_sum(q, k, scale=jnp.ones(()), bias=jnp.zeros(()), positives=None, settings=settings))

  def kernel_dots(jaxpr, inside=False):
    for eqn in jaxpr.eqns:
      if inside and eqn.primitive.name == "dot_general":
        yield eqn.params["precision"]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from kernel_dots(sub, inside or eqn.primitive.name == "pallas_call")

  x = jnp.ones((40, 32), dtype)
  with jax.default_matmul_precision(process_precision):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, x)
  found = list(kernel_dots(jaxpr.jaxpr))
  assert len(found) >= 6  # forward S; backward: S, dS·b and dSᵀ·a (fused) or S and dS·b per kernel
  assert set(found) == {(want, want)}


def test_auto_flavour_follows_the_platform_lowered_for():
  # flavour and interpret "auto" (the defaults) are decided when lowering, not by this process's
  # backend: Mosaic compiled for TPU, Triton compiled for CUDA, interpret mode (no custom call) on CPU.
  settings = engine.Settings(flavour="auto", interpret="auto", block_rows=128, block_cols=128)

  def loss(q, k, s):
    row, col = engine.logsumexp(q, k, scale=s, rows=True, cols=True, exclude=None, include=None,
                                settings=settings)
    return jnp.sum(row) + jnp.sum(col)

  args = (jax.ShapeDtypeStruct((300, 96), jnp.bfloat16), jax.ShapeDtypeStruct((300, 96), jnp.bfloat16),
          jax.ShapeDtypeStruct((300,), jnp.float32))
  targets = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
  counts = {}
  for platform in ("tpu", "cuda", "cpu"):
    mlir = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in targets.values()],
    )(*args).mlir_module()
    counts[platform] = tuple(mlir.count(f"@{t}") for t in targets.values())
  # TPU: fused forward, fused backward; GPU: row and column forward, fused backward
  assert counts == {"tpu": (2, 0), "cuda": (0, 3), "cpu": (0, 0)}


# --------------------------------------------------------------------------------------- settings
def test_settings_from_environment_and_validation():
  env = {"JAXCL_PALLAS_FLAVOUR": "GPU", "JAXCL_PALLAS_INTERPRET": "tpu", "JAXCL_PALLAS_BLOCK_ROWS": "256"}
  s = engine.Settings.from_env(env)
  assert (s.flavour, s.interpret, s.block_rows, s.block_cols) == ("gpu", "tpu", 256, None)
  assert engine.Settings.from_env({"JAXCL_PALLAS_INTERPRET": "0"}).interpret is False
  assert engine.Settings.from_env({}) == engine.Settings()
  with pytest.raises(ValueError, match="JAXCL_PALLAS_BLOCK_COLS must be an integer, got 'x'"):
    engine.Settings.from_env({"JAXCL_PALLAS_BLOCK_COLS": "x"})
  with pytest.raises(ValueError, match=r"`flavour` must be one of .*got 'cuda'"):
    engine.Settings(flavour="cuda")
  with pytest.raises(ValueError, match=r"`interpret` must be one of .*got 'yes'"):
    engine.Settings(interpret="yes")
  with pytest.raises(ValueError, match="`block_rows` must be a positive integer or None, got 0"):
    engine.Settings(block_rows=0)
  with pytest.raises(ValueError, match="`num_stages` must be a non-negative integer, got True"):
    engine.Settings(num_stages=True)
  with pytest.raises(ValueError, match=r"^`fused_backward` must be True or False, got 1\.$"):
    engine.Settings(fused_backward=1)
  with pytest.raises(ValueError, match=r"^`config.loss.pallas.fused_backward_vmem` must be a positive integer "
                                       r"\(bytes\), got 0\.$"):
    engine.DEFAULT.replace(where="config.loss.pallas.", fused_backward_vmem=0)
  with pytest.raises(ValueError, match=r"`config.loss.pallas.block_cols` must be a positive integer or None, "
                                       r"got '128'\.$"):
    engine.DEFAULT.replace(where="config.loss.pallas.", block_cols="128")
  with pytest.raises(ValueError, match=r"Unknown pallas setting `blocks`; expected one of \('flavour', "):
    engine.DEFAULT.replace(blocks=128)
  # Frozen and hashable: a static argument (jit, custom_vjp nondiff arguments).
  assert hash(engine.Settings(block_rows=128)) == hash(engine.Settings(block_rows=128))
  # "auto" / "auto": per lowering platform, compiled Mosaic on TPU, Triton on CUDA, Mosaic interpreted
  # elsewhere (this CPU).
  assert engine._variants(engine.Settings()) == (
      (("tpu",), "tpu", False), (("cuda",), "gpu", False), (None, "tpu", True))
  assert engine._variants(engine.Settings(flavour="tpu", interpret=True)) == ((None, "tpu", True),)
  assert engine._variants(engine.Settings(interpret=False)) == (
      (("tpu",), "tpu", False), (("cuda",), "gpu", False), (None, "tpu", False))


def _grid(jaxpr) -> list[tuple[int, ...]]:
  """The grid of every pallas_call in a jaxpr."""
  grids = re.findall(r"grid=\(([0-9, ]*?),?\)", str(jaxpr))
  return [tuple(map(int, g.split(", ") if g else ())) for g in grids]


def test_two_settings_in_one_process_are_two_programs():
  """No process state: the same jitted loss traced with two settings (block sizes, interpret mode)
  gives two programs, each with its own kernel grid, whatever was traced before; both equal dense."""
  q, k = randn(40, 300, 8), randn(41, 200, 8)
  small = engine.Settings(flavour="tpu", interpret=True, block_rows=128, block_cols=128)
  whole = engine.Settings(flavour="tpu", interpret=True, block_rows=512, block_cols=512)
  fn = lambda q, k, impl: ops.logsumexp(q, k, scale=2.0, impl=impl).rows
  loss = jax.jit(fn, static_argnames="impl")
  grids = {}
  for settings in (small, whole, small):
    grids.setdefault(settings, []).append(_grid(jax.make_jaxpr(functools.partial(fn, impl=settings))(q, k)))
  assert grids[small] == [[(3, 2)], [(3, 2)]]  # 300 rows / 128 (padded to 384), 200 columns / 128
  assert grids[whole] == [[(1, 1)]]  # one (16-padded) block
  want = ops.logsumexp(q, k, scale=2.0, impl="dense").rows
  for settings in (small, whole):
    np.testing.assert_allclose(loss(q, k, impl=settings), want, rtol=1e-5)
  # interpret mode is a setting too: lowered for a TPU, compiled kernels (custom calls) or none.
  args = (jax.ShapeDtypeStruct((300, 8), jnp.float32),) * 2
  for interpret, calls in ((False, 1), (True, 0)):
    settings = engine.Settings(flavour="tpu", interpret=interpret)
    mlir = jax.export.export(jax.jit(functools.partial(loss, impl=settings)), platforms=["tpu"],
                             disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")],
                             )(*args).mlir_module()
    assert mlir.count("@tpu_custom_call") == calls, interpret


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_impl_settings_through_a_loss_under_jit(dtype):
  """`impl=Settings(...)` is the pallas engine with those settings, through a loss and as a static
  argument of jax.jit: value and gradients equal the dense engine (bf16: to bf16 rounding)."""
  a, b = (jnp.asarray(randn(s, 70, 12), dtype) for s in (42, 43))
  settings = engine.Settings(flavour="gpu", interpret=True, block_rows=32, block_cols=16)
  grad = jax.jit(jax.value_and_grad(
      lambda a, b, t, impl: losses.siglip(a, b, logit_scale=1.0 / t, logit_bias=-2.0, impl=impl)
      + losses.nt_xent(a, b, temperature=t, impl=impl), argnums=(0, 1, 2)), static_argnames="impl")
  (value, grads), (want, want_grads) = (grad(a, b, np.float32(0.3), impl=i) for i in (settings, "dense"))
  assert "pallas_call" in str(jax.make_jaxpr(functools.partial(grad, impl=settings))(a, b, np.float32(0.3)))
  np.testing.assert_allclose(value, want, rtol=1e-5 if dtype == jnp.float32 else 1e-3)
  assert grads[0].dtype == dtype
  _assert_grads_close(grads, want_grads, rtol=1e-4 if dtype == jnp.float32 else 2e-2)


def test_bad_settings_and_impl_objects_are_one_line_errors():
  q = jnp.asarray(randn(44, 8, 4))
  with pytest.raises(TypeError, match=r"^`settings` must be a jaxcl.ops.pallas.Settings or None, got 'tpu'\.$"):
    engine.logsumexp(q, q, scale=1.0, rows=True, cols=False, exclude=None, include=None, settings="tpu")
  with pytest.raises(TypeError, match=r"^`impl` must be an engine name or engine settings "
                                      r"\(jaxcl.ops.pallas.Settings\), got \{'flavour': 'tpu'\}\.$"):
    losses.clip(q, q, logit_scale=1.0, impl={"flavour": "tpu"})
  with pytest.raises(ValueError, match=r"`impl` must be one of \('auto', 'dense'.*got 'palas'\.$"):
    ops.logsumexp(q, q, scale=1.0, impl="palas")
  # A loss without a fused kernel names the engines it takes.
  with pytest.raises(ValueError,
                     match=r"`impl` must be one of \('auto', 'dense', 'blockwise'\), got Settings\("):
    losses.filip(q[:, None], q[:, None], logit_scale=1.0, impl=engine.Settings())


def test_bad_block_sizes_and_modes_raise_at_trace_time():
  q = jnp.zeros((300, 8))
  call = lambda **kw: engine.logsumexp(q, q, scale=1.0, rows=True, cols=False, exclude=None, include=None,
                                       settings=engine.Settings(**kw))
  with pytest.raises(ValueError, match=r"`block_rows` must be a multiple of 128 .*300\), got 100"):
    call(flavour="tpu", interpret=True, block_rows=100)
  with pytest.raises(ValueError, match="`block_cols` must be a power of two >= 16 .* got 48"):
    call(flavour="gpu", interpret=True, block_cols=48)
  with pytest.raises(ValueError, match="needs `flavour='tpu'`, got 'gpu'"):
    call(flavour="gpu", interpret="tpu")
  # A block at least as large as the batch is one (16-padded) block, legal in both flavours.
  row, _ = call(flavour="tpu", interpret=True, block_rows=1000)
  np.testing.assert_allclose(row, np.full(300, np.log(300.0)), rtol=1e-5)
