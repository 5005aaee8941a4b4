"""The text side of image–text methods: captions → token ids (clip, siglip) or locked embeddings (lit);
and of the text-only sentence methods: sentence pairs → token ids (`SentenceTokens`).

Captions come from the batch when the data has them, else from the label with a random caption template
of the data (`SourceInfo.caption_templates`: the digits' own, or generic photo prompts for a labelled
folder or tfds dataset), drawn deterministically from the seed and the step. The same templates are the
zero-shot prompts of the evaluation. The trained text tower's vocabulary (`caption_vocabulary`) is what
the run will see: the templates filled with the class names, plus the words of the data's own captions
(a folder's captions file, a tfds `caption_key`), read from the train split once at setup.

CE-CLIP (`losses.ce_clip`) also wants hard-negative captions: `TokenText(..., hard_negatives=H)` makes H
per caption where it tokenises it (`hard_negative_captions`: the caption with its class name swapped
for another class's), sent with the caption as (B, 1 + H, L) tokens, and which of them exist as
`batch["hard_negative_valid"]` (B, H).
"""

from __future__ import annotations

import functools
import re

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


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele, Lea & Flood, 2014), elementwise on uint64: a bijection whose every
  output bit depends on every input bit."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_hash(seed: int, step: int, ids) -> np.ndarray:
  """(B,) uint64 hashes of (seed, step, example id): the same for an example wherever it sits in the
  batch and whichever process reads it.

  >>> bool(example_hash(0, 1, [5])[0] == example_hash(0, 1, [7, 5])[1])
  True
  """
  ids = np.asarray(ids).astype(np.uint64)
  h = _mix64(np.full(ids.shape, np.uint64(int(seed) % 2**64)))
  h = _mix64(h ^ np.uint64(int(step) % 2**64))
  return _mix64(h ^ ids)


def hard_negative_captions(captions, labels, ids, class_names, num: int, *, seed: int, step: int):
  """(texts, valid): `num` hard-negative captions of each caption, a (B, num) nested list, and which of
  them exist, (B, num) bool. Hard negative h of caption i is the caption with every whole-word
  occurrence of its class name `class_names[labels[i]]` replaced by class c_ih's name:

      c_ih = (y_i + 1 + (s_i + h) mod (C − 1)) mod C,    s_i = example_hash(seed, step, ids[i]) mod (C − 1)

  so the `num` <= C − 1 classes are distinct, none is y_i, and the draw is deterministic per (seed, step,
  example id). A caption made from a template names its class, and the swap leaves the rest of it as
  it was: a minimal edit that makes the caption false, as CE-CLIP's generated hard negatives are
  ("Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives to Enhance Visio-Linguistic
  Compositional Understanding", Zhang, Awal & Agrawal, 2024, which swaps objects, attributes and
  relations). A caption that does not name its class gets the caption itself with valid False.

  >>> texts, valid = hard_negative_captions(["the digit two.", "a cat"], [1, 0], [0, 1], ["one", "two", "three"],
  ...                                       2, seed=0, step=0)
  >>> sorted(texts[0]), texts[1], valid.tolist()
  (['the digit one.', 'the digit three.'], ['a cat', 'a cat'], [[True, True], [False, False]])
  """
  labels = np.asarray(labels)
  c = len(class_names)
  if not 1 <= num <= c - 1:
    raise ValueError(f"`num` must be in [1, {c - 1}] (the other classes of {c}), got {num}.")
  start = (example_hash(seed, step, ids) % np.uint64(c - 1)).astype(np.int64)
  others = (labels[:, None] + 1 + (start[:, None] + np.arange(num)[None, :]) % (c - 1)) % c
  texts, valid = [], np.zeros((len(captions), num), bool)
  for i, (caption, y) in enumerate(zip(captions, labels.tolist())):
    pattern = re.compile(rf"\b{re.escape(class_names[y])}\b")
    if pattern.search(caption) is None:
      texts.append([caption] * num)
      continue
    texts.append([pattern.sub(lambda _, name=class_names[o]: name, caption) for o in others[i]])
    valid[i] = True
  return texts, valid


class NoText:
  """Self-supervised methods: only the numeric fields of the batch go to the device."""

  templates = ()

  def prepare(self, config, host: dict, step: int) -> dict:
    return {k: np.asarray(host[k]) for k in NUMERIC_KEYS if k in host}

  def dummy_fields(self, batch: int) -> dict:
    """Zeros shaped as the fields `prepare` adds beside "text" (for a planned batch); {} here."""
    return {}


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

  def __init__(self, config, info, hard_negatives: int = 0, where: str = "hard_negatives"):
    """`hard_negatives` H > 0: H hard-negative captions per caption (`hard_negative_captions`); `where`
    names the setting in errors."""
    self.info = info
    self.class_names = list(info.class_names)
    self.templates = tuple(info.caption_templates)
    self.hard_negatives = int(hard_negatives)
    if self.hard_negatives and not 1 <= self.hard_negatives <= len(self.class_names) - 1:
      raise ValueError(f"`{where}` must be in [1, {len(self.class_names) - 1}]: each hard negative swaps the "
                       f"caption's class name for another of the data's {len(self.class_names)} classes, got "
                       f"{self.hard_negatives}.")
    self.tokenizer = caption_vocabulary(info, own_captions(config, info))
    self.max_len = int(config.model.text_max_len)
    # A planned run (`jaxcl.plan`) cannot read the captions: it sizes the embedding table for the most
    # caption words a run may add, so the plan's memory is an upper bound of the run's.
    planned = 0 if info.from_data or not has_own_captions(info) else CAPTION_WORDS_LIMIT
    self.vocab_size = self.tokenizer.vocab_size + planned

  def tokens(self, texts) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(list(texts), self.max_len), np.int32)

  def dummy(self, batch: int):
    """Zero tokens shaped as `prepare` sends them: (B, L), or (B, 1 + H, L) with hard negatives."""
    return jnp.zeros((batch,) + ((1 + self.hard_negatives,) if self.hard_negatives else ()) + (self.max_len,),
                     jnp.int32)

  def dummy_fields(self, batch: int) -> dict:
    fields = super().dummy_fields(batch)
    if self.hard_negatives:
      fields["hard_negative_valid"] = jnp.zeros((batch, self.hard_negatives), bool)
    return fields

  def prepare(self, config, host: dict, step: int) -> dict:
    out = super().prepare(config, host, step)
    captions = _captions(config, host, step, self.info)
    if not self.hard_negatives:
      out["text"] = self.tokens(captions)
      return out
    negatives, out["hard_negative_valid"] = hard_negative_captions(
        captions, host["label"], host["index"], self.class_names, self.hard_negatives, seed=config.seed, step=step)
    texts = [t for caption, others in zip(captions, negatives) for t in [caption] + others]
    out["text"] = self.tokens(texts).reshape(len(captions), 1 + self.hard_negatives, self.max_len)
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
