"""jaxcl.models (the package's `build_model` and `model_names`): every model by name, and the errors."""

import jax
import jax.numpy as jnp
import pytest

from jaxcl.models import build_model
from jaxcl.models import model_names
from tests.helpers import abstract_init


@pytest.mark.parametrize(
    "name,kwargs,shape,dtype,out",
    [
        ("resnet18", dict(width=4), (2, 16, 16, 3), jnp.float32, (2, 32)),
        ("ResNet-50", dict(width=4), (2, 16, 16, 3), jnp.float32, (2, 128)),
        ("resnet34", dict(width=4, small_image=False), (2, 32, 32, 3), jnp.float32, (2, 32)),
        ("vit_ti", dict(patch_size=8), (2, 16, 16, 3), jnp.float32, (2, 192)),
        ("vit_s", dict(patch_size=8, depth=1), (2, 16, 16, 3), jnp.float32, (2, 384)),
        ("vit_b", dict(patch_size=8, depth=1, pool="gap"), (2, 16, 16, 3), jnp.float32, (2, 768)),
        ("text_transformer", dict(vocab_size=10, width=8, depth=1, heads=2, max_len=6), (2, 6), jnp.int32,
         (2, 8)),
        ("mlp", dict(hidden_dims=(8,), out_dim=3), (2, 4, 4), jnp.float32, (2, 3)),
    ],
)
def test_build_model(name, kwargs, shape, dtype, out):
  model = build_model(name, **kwargs)
  variables = abstract_init(model, *shape, dtype=dtype)
  got = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape, dtype), train=False), variables)
  assert got.shape == out


def test_build_model_errors():
  required = {"resnet18", "resnet50", "vit_ti", "vit_s", "vit_b", "text_transformer", "mlp"}
  assert set(model_names()) >= required
  with pytest.raises(ValueError, match=r"`name` must be one of \('resnet18'.*'mlp'\), got 'resnet101'"):
    build_model("resnet101")
  with pytest.raises(TypeError, match=r"unknown argument\(s\) \['widht'\]; `ResNet` accepts"):
    build_model("resnet18", widht=4)
