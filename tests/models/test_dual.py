"""jaxcl.models.dual: the dual encoder's initial values, gradients reaching the logit scale and bias,
and its towers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import losses
from jaxcl.models import dual as dual_lib
from jaxcl.models.dual import DualEncoder
from jaxcl.models.heads import MatchHead
from jaxcl.models.mlp import MLP
from jaxcl.models.resnet import ResNet
from jaxcl.models.text import TextTransformer
from tests.losses import reference
from tests.helpers import key, randn, random_variables
from tests.models.reference import TOKENS, np_match_head


def _dual(**kwargs):
  return DualEncoder(MLP((8,), norm="none"), MLP((8,), norm="none"), embed_dim=5, **kwargs)


def test_dual_encoder_init_values():
  x, t = randn(0, 4, 6), randn(1, 4, 3)
  model = _dual()
  variables = model.init(key(0), x, t)
  out = model.apply(variables, x, t)
  assert out["image"].shape == (4, 5) and out["text"].shape == (4, 5)
  np.testing.assert_allclose(float(out["logit_scale"]), 1 / 0.07, rtol=1e-6)  # CLIP
  assert out["logit_bias"] is None and "logit_bias" not in variables["params"]
  siglip = _dual(
      logit_scale_init=dual_lib.SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=dual_lib.SIGLIP_LOGIT_BIAS_INIT
  )
  v2 = siglip.init(key(0), x, t)
  out2 = siglip.apply(v2, x, t)
  np.testing.assert_allclose(float(out2["logit_scale"]), 10.0, rtol=1e-6)
  assert float(out2["logit_bias"]) == -10.0
  assert v2["params"]["logit_scale"].dtype == jnp.float32 and v2["params"]["logit_scale"].shape == ()
  # The two towers through `method=` give the same embeddings as the full call.
  img = siglip.apply(v2, x, method="encode_image")
  txt = siglip.apply(v2, t, method=DualEncoder.encode_text)
  np.testing.assert_allclose(img, out2["image"], rtol=1e-6)
  np.testing.assert_allclose(txt, out2["text"], rtol=1e-6)
  capped = _dual(max_logit_scale=5.0)
  assert float(capped.apply(capped.init(key(0), x, t), x, t)["logit_scale"]) == 5.0
  # (B, 1 + H, L) texts (CE-CLIP: each caption, then its H hard negatives) through the one text tower.
  texts = randn(2, 4, 3, 3)
  both = siglip.apply(v2, x, texts)
  assert both["text"].shape == (4, 5) and both["hard_negatives"].shape == (4, 2, 5)
  np.testing.assert_allclose(both["text"], siglip.apply(v2, texts[:, 0], method="encode_text"), rtol=1e-6)
  np.testing.assert_allclose(both["hard_negatives"][:, 1], siglip.apply(v2, texts[:, 2], method="encode_text"),
                             rtol=1e-6)


def test_dual_encoder_match_head_parameters_only_when_given():
  x, t = randn(0, 4, 6), randn(1, 4, 3)
  shapes = lambda model: jax.eval_shape(lambda: model.init(key(0), x, t))["params"]  # noqa: E731
  assert "match_head" not in shapes(_dual())
  model = _dual(match_head=MatchHead(hidden=7))
  assert shapes(model)["match_head"]["dense0"]["kernel"].shape == (15, 7)  # [t; i; t ⊙ i], E = 5
  variables = random_variables(model, x, t, seed=3)

  def embed_and_match(v):
    out = model.apply(v, x, t)
    return out, model.apply(v, out["text"], out["image"], method="match_logits")

  out, logits = jax.jit(embed_and_match)(variables)
  np.testing.assert_allclose(logits, np_match_head(variables["params"]["match_head"], out["text"], out["image"]),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="`match_logits` needs the model's `match_head`, got None"):
    _dual().apply(variables, out["text"], out["image"], method="match_logits")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_dual_encoder_gradients_reach_scale_and_bias(loss):
  x, t = randn(2, 4, 6), randn(3, 4, 3)
  bias_init = -2.0 if loss == "siglip" else None
  model = _dual(logit_bias_init=bias_init)
  variables = random_variables(model, x, t, seed=1)
  variables["params"]["logit_scale"] = np.float32(np.log(3.0))
  if loss == "siglip":
    variables["params"]["logit_bias"] = np.float32(-2.0)

  def objective(params):
    out = model.apply({"params": params}, x, t)
    if loss == "clip":
      return losses.clip(out["image"], out["text"], logit_scale=out["logit_scale"])
    return losses.siglip(
        out["image"], out["text"], logit_scale=out["logit_scale"], logit_bias=out["logit_bias"]
    )

  grads = jax.grad(objective)(variables["params"])
  out = model.apply(variables, x, t)
  img, txt = np.asarray(out["image"], np.float64), np.asarray(out["text"], np.float64)

  # d loss / d log-scale (and d bias) by central differences of the float64 reference loss.
  def ref(theta):
    if loss == "clip":
      return reference.clip.clip(img, txt, np.exp(theta[0]))
    return reference.clip.siglip(img, txt, np.exp(theta[0]), theta[1])

  theta = np.array([np.log(3.0), -2.0])
  want = reference.common.numerical_grad(ref, theta)
  np.testing.assert_allclose(float(grads["logit_scale"]), want[0], rtol=1e-4, atol=1e-6)
  assert abs(want[0]) > 1e-3
  if loss == "siglip":
    np.testing.assert_allclose(float(grads["logit_bias"]), want[1], rtol=1e-4, atol=1e-6)
  # Gradients also reach both towers and projections.
  for name in ("image_projection", "text_projection", "image_encoder", "text_encoder"):
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[name])), name


def test_dual_encoder_with_resnet_and_text_transformer():
  image = ResNet(stage_sizes=(1,), width=4)
  text = TextTransformer(vocab_size=10, width=8, depth=1, heads=2, max_len=6)
  model = DualEncoder(image, text, embed_dim=3, logit_bias_init=-10.0)
  x = randn(4, 2, 8, 8, 3)
  variables = random_variables(model, x, TOKENS[:2], train=False, seed=5)
  assert set(variables) == {"params", "batch_stats"}
  out, state = model.apply(variables, x, TOKENS[:2], train=True, mutable=["batch_stats"])
  assert out["image"].shape == (2, 3) and out["text"].shape == (2, 3)
  assert not np.allclose(
      state["batch_stats"]["image_encoder"]["stem_norm"]["mean"],
      variables["batch_stats"]["image_encoder"]["stem_norm"]["mean"],
  )
  with pytest.raises(ValueError, match=r"`logit_scale_init` must be finite.*got inf"):
    bad = DualEncoder(image, text, embed_dim=3, logit_scale_init=float("inf"))
    jax.eval_shape(lambda: bad.init(key(0), x, TOKENS[:2]))
