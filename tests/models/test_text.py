"""jaxcl.models.text: the text transformer against the float64 NumPy reference (padding invariance,
bad inputs) and the simple tokenizer."""

import jax
import numpy as np
import pytest

from jaxcl.models.text import SimpleTokenizer
from jaxcl.models.text import TextTransformer
from tests.helpers import assert_close, key, random_variables
from tests.models.reference import np_text, TOKENS


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
  a, cat, photo, dot, dog = 4, 6, 7, 8, 9  # ids of "a", "cat", "photo", ".", "dog" ("of" is 5)
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
