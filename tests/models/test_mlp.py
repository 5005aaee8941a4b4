"""jaxcl.models.mlp: the MLP encoder against a float64 NumPy reference."""

import numpy as np

from jaxcl.models.mlp import MLP
from tests.helpers import assert_close, randn, random_variables
from tests.models.reference import f64, layer_norm, relu


def test_mlp_encoder_matches_numpy_reference():
  model = MLP(hidden_dims=(16, 8), out_dim=4, norm="layer")
  x = randn(12, 3, 2, 5)
  variables = random_variables(model, x, seed=13)
  p = f64(variables["params"])
  h = x.reshape(3, -1).astype(np.float64)
  for i in range(2):
    h = relu(layer_norm(h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"], p[f"norm{i}"], 1e-5))
  want = h @ p["out"]["kernel"] + p["out"]["bias"]
  assert_close(model.apply(variables, x), want)
  assert model.output_dim == 4 and MLP((16, 8)).output_dim == 8
