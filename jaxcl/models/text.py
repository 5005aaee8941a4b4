"""A text transformer encoder over token ids (0 = padding), and a small offline tokenizer."""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl.models import _layers

POOLS = ("eos", "mean")


class TextTransformer(nn.Module):
  r"""Transformer text encoder: token + learned position embeddings → pre-LN blocks → LN → pool.

  The text tower of CLIP ("Learning Transferable Visual Models From Natural Language Supervision",
  Radford et al., 2021): causal self-attention (by default) and the final state of the last real token
  (the end-of-text token of `SimpleTokenizer`) as the text representation (pool="eos"); pool="mean"
  averages the states of the non-padding tokens instead.

      z_0 = E_tok[t] + E_pos[0:L];  ViT blocks where query i sees key j iff t_j ≠ 0 (and j ≤ i if causal)
      y   = LN(z_L)[last i with t_i ≠ 0]     or     Σ_{i: t_i ≠ 0} LN(z_L)[i] / #{i: t_i ≠ 0}

  Padding tokens (id 0) are never attended to and never pooled, so appending padding does not change
  the output. Sequences are right-padded.

  Attributes:
    vocab_size: number of token ids (id 0 is padding). width: token width. depth: number of blocks.
    heads: attention heads. max_len: longest sequence (size of the position table).
    pool: "eos" or "mean". causal: causal attention mask (CLIP).
    mlp_dim: block MLP size (default 4·width). dropout: train-mode dropout rate.
    dtype: compute dtype; parameters are `param_dtype` (float32).
    remat: recompute each block's activations in the backward pass (`jax.checkpoint`), as `ViT.remat`.

  >>> import jax, jax.numpy as jnp
  >>> model = TextTransformer(vocab_size=10, width=8, depth=1, heads=2, max_len=6)
  >>> tokens = jnp.array([[2, 5, 3, 0], [2, 3, 0, 0]], jnp.int32)
  >>> variables = model.init(jax.random.key(0), tokens, train=False)
  >>> model.apply(variables, tokens, train=False).shape
  (2, 8)
  """

  vocab_size: int
  width: int
  depth: int
  heads: int
  max_len: int
  pool: str = "eos"
  causal: bool = True
  mlp_dim: int | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ln_eps: float = 1e-5
  remat: bool = False

  @property
  def output_dim(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    _checks.check_choice("pool", self.pool, POOLS)
    _layers.check_heads(self.width, self.heads)
    tokens = _layers.check_tokens("tokens", tokens, self.max_len)
    length = tokens.shape[1]
    valid = tokens != 0  # (B, L)
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(0.02), name="token_embed",
    )(tokens)
    pos = self.param(
        "pos_embedding", nn.initializers.normal(0.01), (self.max_len, self.width), self.param_dtype
    )
    x = x + pos[:length].astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    mask = valid[:, None, None, :]  # (B, 1, 1, L): keys that may be attended to
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    block = _layers.block_class(_layers.PreLNBlock, self.remat, static_argnums=(3,))
    for i in range(self.depth):
      x = block(
          self.heads, self.mlp_dim or 4 * self.width, self.dropout, ln_eps=self.ln_eps,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"block{i}",
      )(x, mask, train)
    x = nn.LayerNorm(
        epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm"
    )(x)
    if self.pool == "eos":
      last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    w = valid.astype(jnp.float32)
    total = jnp.einsum("bl,bld->bd", w, x, preferred_element_type=jnp.float32)
    return (total / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)).astype(self.dtype)


_WORD = re.compile(r"\w+|[^\w\s]")
LEVELS = ("word", "char")


class SimpleTokenizer:
  r"""A deterministic word- or character-level tokenizer with a fixed vocabulary, fully offline.

  Ids: 0 = <pad>, 1 = <unk>, 2 = <bos>, 3 = <eos>, then the vocabulary in the given order. Words are
  runs of letters/digits or single punctuation marks (lower-cased by default); characters are single
  code points (spaces included). `encode` returns <bos> tokens… <eos> right-padded with 0 to `max_len`;
  longer texts are truncated but keep their <eos>, so pool="eos" of `TextTransformer` sees it.

  >>> tok = SimpleTokenizer.from_texts(["a photo of a cat.", "a photo of a dog."])
  >>> tok.vocab[:4]
  ['a', '.', 'of', 'photo']
  >>> tok.encode(["a photo of a cat", "a bird"], max_len=8).tolist()
  [[2, 4, 7, 6, 4, 8, 3, 0], [2, 4, 1, 3, 0, 0, 0, 0]]
  """

  SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
  PAD, UNK, BOS, EOS = 0, 1, 2, 3

  def __init__(self, vocab: Sequence[str], *, level: str = "word", lowercase: bool = True):
    _checks.check_choice("level", level, LEVELS)
    vocab = list(vocab)
    seen = set()
    for token in vocab:
      if not isinstance(token, str) or not token:
        raise TypeError(f"`vocab` entries must be non-empty strings, got {token!r}.")
      if token in self.SPECIALS:
        raise ValueError(f"`vocab` must not contain the special tokens {self.SPECIALS}, got {token!r}.")
      if token in seen:
        raise ValueError(f"`vocab` must not repeat a token, got {token!r} twice.")
      seen.add(token)
    self.vocab = vocab
    self.level = level
    self.lowercase = lowercase
    self._ids = {t: i + len(self.SPECIALS) for i, t in enumerate(vocab)}
    self._tokens = list(self.SPECIALS) + vocab

  @classmethod
  def from_texts(
      cls,
      texts: Iterable[str],
      *,
      level: str = "word",
      lowercase: bool = True,
      min_count: int = 1,
      max_size: int | None = None,
  ) -> SimpleTokenizer:
    """Builds the vocabulary from `texts`: tokens seen >= min_count times, most frequent first (ties
    alphabetical), at most `max_size` of them."""
    _checks.check_choice("level", level, LEVELS)
    probe = cls([], level=level, lowercase=lowercase)
    counts = collections.Counter(t for text in _as_list(texts) for t in probe.tokenize(text))
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return cls(ranked[:max_size], level=level, lowercase=lowercase)

  @property
  def vocab_size(self) -> int:
    """Number of ids (the specials included): the `vocab_size` of a matching TextTransformer."""
    return len(self._tokens)

  def tokenize(self, text: str) -> list[str]:
    if not isinstance(text, str):
      raise TypeError(f"`texts` must contain strings, got {type(text).__name__}: {text!r}.")
    if self.lowercase:
      text = text.lower()
    return _WORD.findall(text) if self.level == "word" else list(text)

  def encode(self, texts: str | Sequence[str], max_len: int) -> np.ndarray:
    """(N, max_len) int32 ids: <bos> tokens <eos>, truncated to fit, right-padded with 0."""
    if int(max_len) < 2:
      raise ValueError(f"`max_len` must be >= 2 (room for <bos> and <eos>), got {max_len}.")
    texts = _as_list(texts)
    out = np.zeros((len(texts), int(max_len)), np.int32)
    for n, text in enumerate(texts):
      ids = [self._ids.get(t, self.UNK) for t in self.tokenize(text)][: max_len - 2]
      ids = [self.BOS] + ids + [self.EOS]
      out[n, : len(ids)] = ids
    return out

  def decode(self, ids: Any) -> list[str]:
    """Texts back from (N, L) ids (specials dropped, unknown tokens shown as <unk>)."""
    ids = np.asarray(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    sep = " " if self.level == "word" else ""
    texts = []
    for row in ids:
      toks = [self._tokens[i] for i in row if i not in (self.PAD, self.BOS, self.EOS)]
      texts.append(sep.join(toks))
    return texts


def _as_list(texts: str | Iterable[str]) -> list[str]:
  return [texts] if isinstance(texts, str) else list(texts)
