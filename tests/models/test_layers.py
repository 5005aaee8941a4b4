"""jaxcl.models._layers, shared by the encoders: rematerialised blocks (`block_class`) give the same
values, gradients and statistics, and bfloat16 compute (the `dtype` of every layer) stays close to float32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import build_model
from jaxcl.models.resnet import ResNet
from jaxcl.models.text import TextTransformer
from jaxcl.models.vit import ViT
from tests.helpers import key, randn, random_variables
from tests.models.reference import TOKENS


IMAGES = np.random.default_rng(11).normal(size=(2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("name, kwargs, inputs", [
    ("resnet18", {"width": 4}, IMAGES),
    ("vit_b", {"hidden": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "patch_size": 4}, IMAGES),
    ("text_transformer", {"vocab_size": 10, "width": 16, "depth": 2, "heads": 2, "max_len": 12}, TOKENS),
])
def test_remat_recomputes_blocks_with_the_same_values_gradients_and_statistics(name, kwargs, inputs):
  """remat=True: the same train-mode output, parameter gradients and BatchNorm running statistics as
  remat=False (same variables), and the backward really recomputes: the gradient's jaxpr holds one
  checkpoint per block (none without remat)."""
  results = []
  for remat in (False, True):
    model = build_model(name, remat=remat, **kwargs)
    variables = random_variables(model, inputs, train=False, seed=12)

    def loss(params):
      out, state = model.apply({**variables, "params": params}, inputs, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out)), state

    grad = jax.grad(loss, has_aux=True)
    checkpoints = len(re.findall(r"\b(?:checkpoint|remat2)\[", str(jax.make_jaxpr(grad)(variables["params"]))))
    (g, state) = jax.jit(grad)(variables["params"])
    results.append((jax.jit(loss)(variables["params"])[0], g, state, checkpoints))
  (value, g, state, none), (value_r, g_r, state_r, some) = results
  blocks = 8 if name == "resnet18" else 2
  assert none == 0 and some == blocks
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((g_r, state_r)), jax.tree.leaves((g, state)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["resnet", "vit", "text"])
def test_bf16_compute_close_to_fp32(kind):
  if kind == "resnet":
    make = lambda dt: ResNet(stage_sizes=(1, 1), width=8, dtype=dt)  # noqa: E731
    x = randn(6, 4, 8, 8, 3)
  elif kind == "vit":
    make = lambda dt: ViT(patch_size=4, hidden=16, depth=2, heads=2, mlp_dim=32, dtype=dt)  # noqa: E731
    x = randn(7, 4, 8, 8, 3)
  else:
    make = lambda dt: TextTransformer(  # noqa: E731
        vocab_size=10, width=16, depth=2, heads=2, max_len=8, dtype=dt
    )
    x = TOKENS
  f32, bf16 = make(jnp.float32), make(jnp.bfloat16)
  variables = random_variables(f32, x, train=False, seed=15)
  v_bf16 = jax.eval_shape(lambda: bf16.init(key(0), x, train=False))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v_bf16))  # float32 parameters
  want = np.asarray(f32.apply(variables, x, train=False), np.float64)
  got = bf16.apply(variables, x, train=False)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32), np.float64)
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert err < 3e-2, err
  cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
  assert np.all(cos > 0.999), cos
