"""The text side of image–text methods: captions → token ids (clip, siglip) or locked embeddings (lit);
and of the text-only sentence methods: sentence pairs → token ids (`SentenceTokens`).

Captions come from the batch when the data has them, else from the label with a random caption template
of the data (`SourceInfo.caption_templates`: the digits' own, or generic photo prompts for a labelled
folder or tfds dataset), drawn deterministically from the seed and the step. The same templates are the
zero-shot prompts of the evaluation. The trained text tower's vocabulary (`caption_vocabulary`) is what
the run will see: the templates filled with the class names, plus the words of the data's own captions
(a folder's captions file, a tfds `caption_key`), read from the train split once at setup.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.data import digits
from jaxcl.data import sources

NUMERIC_KEYS = ("image", "label", "index")
# At most this many words of the data's own captions join the vocabulary (the most frequent ones).
CAPTION_WORDS_LIMIT = 32768


def _captions(config, host: dict, step: int, info) -> list[str]:
  if "caption" in host:
    return [str(c) for c in host["caption"]]
  rng = np.random.default_rng([config.seed, step])
  return digits.captions_for_labels(host["label"], rng, info.caption_templates, info.class_names)


class NoText:
  """Self-supervised methods: only the numeric fields of the batch go to the device."""

  templates = ()

  def prepare(self, config, host: dict, step: int) -> dict:
    return {k: np.asarray(host[k]) for k in NUMERIC_KEYS if k in host}


def has_own_captions(info) -> bool:
  """The data carries captions of its own (not made from the labels)."""
  return bool(info.has_captions and not info.captions_from_labels)


def own_captions(config, info) -> tuple[str, ...]:
  """The captions of the train split when the data has its own and `info` was read from the data (not
  planned from the config), else ()."""
  if not (info.from_data and has_own_captions(info)):
    return ()
  return sources.read_captions(config.data, config.data.train_split)


def caption_vocabulary(info, captions=(), *, limit: int = CAPTION_WORDS_LIMIT):
  """A `SimpleTokenizer` of the words a run will see, in a fixed order:

      vocab = words(templates × class names)          ranked as `SimpleTokenizer.from_texts` ranks
            + words(captions) − those                 most frequent first, ties alphabetical, ≤ limit

  so the templates' words keep their ids whatever the captions; without captions it is exactly
  `SimpleTokenizer.from_texts(templates × class names)`.
  """
  from jaxcl import models

  if int(limit) < 0:
    raise ValueError(f"`limit` must be >= 0, got {limit!r}.")
  corpus = [t.format(c) for t in info.caption_templates for c in info.class_names]
  tokenizer = models.SimpleTokenizer.from_texts(corpus)
  if not captions:
    return tokenizer
  known = set(tokenizer.vocab)
  words = [w for w in models.SimpleTokenizer.from_texts(captions).vocab if w not in known]
  return models.SimpleTokenizer(tokenizer.vocab + words[:int(limit)])


class TokenText(NoText):
  """A trained text tower on token ids from an offline tokenizer (`caption_vocabulary`)."""

  def __init__(self, config, info):
    self.info = info
    self.class_names = list(info.class_names)
    self.templates = tuple(info.caption_templates)
    self.tokenizer = caption_vocabulary(info, own_captions(config, info))
    self.max_len = int(config.model.text_max_len)
    # A planned run (`jaxcl.plan`) cannot read the captions: it sizes the embedding table for the most
    # caption words a run may add, so the plan's memory is an upper bound of the run's.
    planned = 0 if info.from_data or not has_own_captions(info) else CAPTION_WORDS_LIMIT
    self.vocab_size = self.tokenizer.vocab_size + planned

  def tokens(self, texts) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(list(texts), self.max_len), np.int32)

  def dummy(self, batch: int):
    return jnp.zeros((batch, self.max_len), jnp.int32)

  def prepare(self, config, host: dict, step: int) -> dict:
    out = super().prepare(config, host, step)
    out["text"] = self.tokens(_captions(config, host, step, self.info))
    return out

  def encode_for_eval(self, model, variables, texts):
    """The text tower's embeddings of `texts`, compiled once per model (the zero-shot evaluation calls
    it once per class with the same number of prompts)."""
    if getattr(self, "_encoder_of", None) is not model:
      self._encoder_of = model
      self._encode = jax.jit(functools.partial(model.apply, train=False, method="encode_text"))
    return self._encode(variables, jnp.asarray(self.tokens(texts)))


class LockedText(NoText):
  """LiT: the pretrained MiniLM sentence encoder, locked; embeddings are cached per caption."""

  def __init__(self, config, info):
    from jaxcl.models import minilm

    self.info = info
    self.class_names = list(info.class_names)
    self.templates = tuple(info.caption_templates)
    self.encoder = minilm.load_minilm()
    self.embed_dim = int(self.encode(["a"]).shape[1])
    self._cache: dict[str, np.ndarray] = {}

  def encode(self, texts) -> np.ndarray:
    return np.asarray(self.encoder.encode(list(texts)), np.float32)

  def embeddings(self, texts) -> np.ndarray:
    missing = sorted({t for t in texts if t not in self._cache})
    if missing:
      self._cache.update(zip(missing, self.encode(missing)))
    return np.stack([self._cache[t] for t in texts])

  def dummy(self, batch: int):
    return jnp.zeros((batch, self.embed_dim), jnp.float32)

  def prepare(self, config, host: dict, step: int) -> dict:
    out = super().prepare(config, host, step)
    out["text"] = self.embeddings(_captions(config, host, step, self.info))
    return out

  def encode_for_eval(self, model, variables, texts):
    return jnp.asarray(self.embeddings(list(texts)))


class SentenceTokens(NoText):
  """Sentence methods (`jaxcl.train.methods.sentence`): each example's two sentences as token ids, the
  batch's "text" (b, 2, L) int32 (L = `config.model.text_max_len`), next to its label and index.

  The two sentences are the pair (summary, description) with `config.sentence.positives = "pairs"`,
  or the summary twice with "dropout" (the two encodings differ by their dropout masks: unsupervised
  SimCSE). The tokenizer: the pretrained MiniLM's WordPiece (`config.sentence.encoder = "minilm"`,
  whose weights it holds as `pretrained`), or for "bert" (trained from scratch) a word vocabulary of
  the train split's sentences (`SimpleTokenizer.from_texts`; the corpus is read even for a planned run:
  it ships with the installed packages).
  """

  def __init__(self, config, info):
    self.max_len = int(config.model.text_max_len)
    self.pairs = config.sentence.positives == "pairs"
    self.pretrained = None
    if config.sentence.encoder == "minilm":
      from jaxcl.models import minilm

      self.pretrained = minilm.load_minilm(jnp.dtype(config.model.dtype))
      self.tokenizer = self.pretrained.tokenizer
    else:
      from jaxcl import models

      pairs = sentence_pairs(config.data, config.data.train_split)
      self.tokenizer = models.SimpleTokenizer.from_texts([t for pair in pairs for t in pair])
    self.vocab_size = int(self.tokenizer.vocab_size)

  def tokens(self, texts) -> np.ndarray:
    """(N, L) int32 token ids of `texts`, padded (0) or truncated to L."""
    return np.asarray(self.tokenizer.encode([str(t) for t in texts], self.max_len), np.int32)

  def dummy(self, batch: int):
    return jnp.zeros((batch, self.max_len), jnp.int32)

  def prepare(self, config, host: dict, step: int) -> dict:
    out = super().prepare(config, host, step)
    second = host["description"] if self.pairs else host["summary"]
    out["text"] = np.stack([self.tokens(host["summary"]), self.tokens(second)], axis=1)
    return out


def sentence_pairs(data_config, split: str) -> tuple[tuple[str, str], ...]:
  """The (summary, description) pairs of a sentence-pair source's `split`, in the source's order."""
  source, _ = sources.build_source(data_config, split)
  return tuple((str(e["summary"]), str(e["description"])) for e in (source[i] for i in range(len(source))))
