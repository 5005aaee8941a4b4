"""jaxcl.models.heads: the projection, prediction and matching heads against a float64 NumPy reference."""

import jax
import numpy as np
import pytest

from jaxcl.models.heads import MatchHead
from jaxcl.models.heads import PredictionHead
from jaxcl.models.heads import ProjectionHead
from tests.helpers import assert_close, key, randn, random_variables
from tests.models.reference import batch_norm_eval, batch_norm_train, f64, layer_norm, np_match_head, relu


def np_head(params, x, n_hidden, norm, output_norm=False, stats=None):
  """Dense → norm → ReLU … → Dense (→ norm without affine). BatchNorm uses the batch statistics, or
  the running ones if `stats` is given; LayerNorm normalises each example."""
  p = f64(params)
  s = f64(stats) if stats is not None else None
  identity = {"scale": 1.0, "bias": 0.0}

  def normalise(y, i):
    if norm == "layer":
      return layer_norm(y, p.get(f"ln{i}", identity), 1e-5)
    if s is None:
      return batch_norm_train(y, p.get(f"bn{i}", {}))
    return batch_norm_eval(y, p.get(f"bn{i}", identity), s[f"bn{i}"])

  for i in range(n_hidden):
    d = p[f"dense{i}"]
    x = x @ d["kernel"] + d.get("bias", 0.0)
    x = relu(normalise(x, i) if norm != "none" else x)
  d = p[f"dense{n_hidden}"]
  x = x @ d["kernel"] + d.get("bias", 0.0)
  return normalise(x, n_hidden) if output_norm else x


@pytest.mark.parametrize(
    "norm,output_norm", [("batch", False), ("none", False), ("batch", True), ("layer", True)]
)
def test_projection_head_matches_numpy_reference(norm, output_norm):
  head = ProjectionHead(hidden_dims=(16, 12), out_dim=6, norm=norm, output_norm=output_norm)
  x = randn(8, 5, 10)
  variables = random_variables(head, x, train=False, seed=9)
  assert ("batch_stats" in variables) == (norm == "batch")
  # Dense layers followed by a norm have no bias (the norm's shift replaces it).
  assert ("bias" in variables["params"]["dense0"]) == (norm == "none")
  out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
  want = np_head(variables["params"], x.astype(np.float64), 2, norm, output_norm)
  assert out.shape == (5, 6)
  assert_close(out, want)
  if norm == "batch":
    eval_out = head.apply(variables, x, train=False)
    assert_close(eval_out, np_head(variables["params"], x.astype(np.float64), 2, norm, output_norm,
                                   stats=variables["batch_stats"]))


def test_projection_head_group_norm_is_per_example():
  head = ProjectionHead(hidden_dims=(16,), out_dim=4, norm="group")
  x = randn(9, 6, 10)
  variables = random_variables(head, x, seed=10)
  assert set(variables) == {"params"} and variables["params"]["gn0"]["scale"].shape == (16,)
  out = head.apply(variables, x, train=True)
  assert_close(head.apply(variables, x[2:3], train=True)[0], np.asarray(out[2], np.float64), atol=1e-6)


def test_prediction_head_matches_numpy_reference():
  head = PredictionHead(hidden_dim=32, out_dim=8)
  z = randn(10, 6, 8)
  variables = random_variables(head, z, train=False, seed=11)
  out, _ = head.apply(variables, z, train=True, mutable=["batch_stats"])
  assert out.shape == (6, 8)
  assert_close(out, np_head(variables["params"], z.astype(np.float64), 1, "batch"))
  with pytest.raises(ValueError, match=r"`norm` must be one of \('batch', .*'none'\), got 'bn'"):
    jax.eval_shape(lambda: PredictionHead(8, 4, norm="bn").init(key(0), z))
  with pytest.raises(ValueError, match=r"`x` must have rank 2"):
    jax.eval_shape(lambda: head.init(key(0), z[None]))


def test_match_head_matches_numpy_reference():
  head = MatchHead(hidden=12)
  a, d = randn(12, 5, 4), 3.0 * randn(13, 5, 4)  # unnormalised: the head normalises
  variables = random_variables(head, a, d, seed=12)
  assert jax.tree.map(np.shape, variables["params"]) == {
      "dense0": {"kernel": (12, 12), "bias": (12,)}, "ln": {"scale": (12,), "bias": (12,)},
      "dense1": {"kernel": (12, 2), "bias": (2,)}}
  assert_close(jax.jit(head.apply)(variables, a, d), np_match_head(variables["params"], a, d))
  with pytest.raises(ValueError, match=r"`anchor` and `data` must have the same shape, got \(5, 4\) and \(5, 3\)"):
    jax.eval_shape(lambda: head.init(key(0), a, d[:, :3]))
