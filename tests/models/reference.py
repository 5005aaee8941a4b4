"""float64 NumPy building blocks of the models (written from the papers, sharing no code with jaxcl):
the references of the tests in tests/models/."""

import flax
import jax
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf


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


def np_match_head(params, anchor, data):
  """GRAM's matching head: [a; d; a ⊙ d] of the unit rows → Dense → GELU → LayerNorm(1e-12) → Dense(2)."""
  p = f64(params)
  a, d = (np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
          for x in (anchor, data))
  h = np.concatenate([a, d, a * d], axis=1) @ p["dense0"]["kernel"] + p["dense0"]["bias"]
  h = layer_norm(gelu(h), p["ln"], 1e-12)
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"]


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


TOKENS = np.array([[2, 7, 5, 9, 3, 0], [2, 4, 3, 0, 0, 0], [2, 8, 8, 6, 4, 3]], np.int32)
