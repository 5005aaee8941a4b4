"""jaxcl.models.vit: the forward pass against the float64 NumPy reference, parameter counts, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models.vit import ViT
from jaxcl.models.vit import ViT_B
from jaxcl.models.vit import ViT_S
from jaxcl.models.vit import ViT_Ti
from tests.helpers import abstract_init, assert_close, key, n_params, randn, random_variables
from tests.models.reference import np_vit


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_matches_numpy_reference(pool):
  model = ViT(patch_size=4, hidden=16, depth=2, heads=4, mlp_dim=24, pool=pool)
  x = randn(5, 2, 8, 12, 3)
  variables = random_variables(model, x, train=False, seed=4)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  want = np_vit(variables["params"], x.astype(np.float64), 4, 4, 2, pool)
  assert got.shape == (2, 16)
  assert_close(got, want)
  n_tokens = 6 + (pool == "cls")
  assert variables["params"]["pos_embedding"].shape == (1, n_tokens, 16)


@pytest.mark.parametrize(
    "config,want",
    [
        # timm vit_{tiny,small,base}_patch16_224 minus the 1000-way head.
        (ViT_Ti, 5_717_416 - 193_000),
        (ViT_S, 22_050_664 - 385_000),
        (ViT_B, 86_567_656 - 769_000),  # 85,798,656
    ],
)
def test_vit_parameter_counts(config, want):
  model = config()
  variables = abstract_init(model, 1, 224, 224, 3)
  assert n_params(variables) == want
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)), train=False), variables)
  assert out.shape == (2, model.hidden)
  assert (model.hidden, model.depth, model.heads) == {
      ViT_Ti: (192, 12, 3), ViT_S: (384, 12, 6), ViT_B: (768, 12, 12)
  }[config]


def test_vit_bad_inputs():
  model = ViT(patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=8)
  with pytest.raises(ValueError, match=r"multiples of `patch_size`=4, got shape \(1, 8, 10, 3\)"):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros((1, 8, 10, 3))))
  variables = random_variables(model, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"gives 17 tokens .* initialised for 5"):
    model.apply(variables, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"`hidden` \(8\) must be divisible by `heads`, got heads=3"):
    bad = ViT(patch_size=4, hidden=8, depth=1, heads=3, mlp_dim=8)
    jax.eval_shape(lambda: bad.init(key(0), jnp.zeros((1, 8, 8, 3))))


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_feature_map_is_the_patch_tokens_on_their_grid(pool):
  # depth 0: a patch's token depends on its own pixels only, so the grid layout is visible.
  model = ViT(patch_size=4, hidden=8, depth=0, heads=2, mlp_dim=8, pool=pool)
  x = randn(7, 2, 8, 12, 3)
  variables = random_variables(model, x, train=False, seed=6)
  moved = x.copy()
  moved[:, 4:8, 8:12] += 1.0  # the patch at grid row 1, column 2
  run = jax.jit(lambda v, x: (model.apply(v, x, method="feature_map"), model.apply(v, x),
                              model.apply(v, x, method="tokens")))
  (fmap, pooled, tokens), (fmap2, _, _) = run(variables, x), run(variables, moved)
  assert fmap.shape == (2, 2, 3, 8) and tokens.shape == (2, 6 + (pool == "cls"), 8)
  changed = np.any(np.asarray(fmap) != np.asarray(fmap2), axis=(0, 3))
  np.testing.assert_array_equal(changed, np.arange(6).reshape(2, 3) == 5)
  np.testing.assert_array_equal(np.asarray(fmap).reshape(2, 6, 8), np.asarray(tokens)[:, pool == "cls":])
  want = tokens[:, 0] if pool == "cls" else jnp.mean(fmap, axis=(1, 2))
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(want), rtol=1e-6, atol=1e-6)
