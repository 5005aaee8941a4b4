"""jaxcl.eval.zero_shot: CLIP's prompt ensembling and zero-shot accuracy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.eval import zero_shot
from tests.helpers import unit


class FakeTextEncoder:
  """A fixed random embedding per prompt string; records the calls."""

  def __init__(self, dim=6):
    self.dim, self.table, self.calls = dim, {}, []

  def vector(self, text):
    if text not in self.table:
      self.table[text] = np.random.default_rng(len(self.table)).standard_normal(self.dim)
    return self.table[text]

  def __call__(self, texts):
    self.calls.append(list(texts))
    return jnp.asarray(np.stack([self.vector(t) for t in texts]), jnp.float32)


def test_class_embeddings_is_clip_prompt_ensembling():
  enc = FakeTextEncoder()
  names = ["cat", "dog", "car"]
  templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}", "{} in the wild"]
  got = zero_shot.class_embeddings(enc, names, templates)
  assert got.shape == (3, 6) and got.dtype == jnp.float32
  assert enc.calls[1] == ["a photo of a dog.", "a drawing of a dog", "dog in the wild"]
  for c, name in enumerate(names):
    prompts = [f"a photo of a {name}.", f"a drawing of a {name}", f"{name} in the wild"]
    want = unit(np.mean(unit(np.stack([enc.table[p] for p in prompts])), axis=0)[None])[0]
    np.testing.assert_allclose(got[c], want, rtol=1e-5, atol=1e-6)
  # One template: the normalised embedding of the bare name.
  single = zero_shot.class_embeddings(enc, ["cat"])
  np.testing.assert_allclose(single[0], unit(enc.table["cat"][None])[0], rtol=1e-5, atol=1e-6)


def test_zero_shot_accuracy_on_constructed_embeddings():
  rng = np.random.default_rng(11)
  classes = unit(rng.standard_normal((5, 16)))
  labels = rng.integers(0, 5, 64).astype(np.int32)
  images = (classes[labels] + 0.35 * rng.standard_normal((64, 16))).astype(np.float32)
  s = unit(images) @ classes.T
  order = np.argsort(-s, axis=1)
  for k in (1, 2, 5):
    want = np.mean([labels[i] in order[i, :k] for i in range(64)])
    got = zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels, top_k=k)
    assert float(got) == pytest.approx(want, abs=1e-6), k
    chunked = zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels, top_k=k, chunk=5)
    assert float(chunked) == float(got)
  top1 = float(zero_shot.zero_shot_accuracy(images, classes.astype(np.float32), labels))
  assert 0.5 < top1 < 1.0
  np.testing.assert_allclose(zero_shot.zero_shot_logits(images, classes.astype(np.float32)), s, atol=1e-5)
  # Collapsed embeddings (all scores tied) are not counted as correct.
  assert float(zero_shot.zero_shot_accuracy(np.ones((4, 3)), np.ones((3, 3)), np.array([0, 1, 2, 0]))) == 0.0
  # bf16 images: same accuracy up to a few borderline rows.
  lo = zero_shot.zero_shot_accuracy(jnp.asarray(images, jnp.bfloat16), classes.astype(np.float32), labels)
  assert lo.dtype == jnp.float32 and abs(float(lo) - top1) <= 3 / 64


def test_zero_shot_end_to_end_with_encoder():
  enc = FakeTextEncoder(dim=8)
  names = ["red", "green", "blue", "grey"]
  class_emb = zero_shot.class_embeddings(enc, names, ["a {} thing", "the colour {}"])
  labels = np.array([3, 0, 2, 1, 1, 0], np.int32)
  images = np.asarray(class_emb)[labels] * 3.0  # scale does not matter: cosine similarity
  assert float(zero_shot.zero_shot_accuracy(images, class_emb, labels)) == 1.0


# ------------------------------------------------------------------------------------------ bad inputs
E = np.ones((6, 4), np.float32)


L = np.array([0, 1, 2, 0, 1, 2], np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), ["a"], ["no placeholder"]), r"`templates\[0\]` must be a str containing"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), [], ["{}"]), r"`class_names` must be a non-empty"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), "cat", ["{}"]), r"`class_names` must be a non-empty sequence of str"),
        (lambda: zero_shot.class_embeddings(FakeTextEncoder(), ["a"], []), r"`templates` must be a non-empty"),
        (lambda: zero_shot.class_embeddings(lambda t: jnp.ones((len(t) + 1, 3)), ["a"], ["{}"]), r"`encode_text` must return shape \(1, D\)"),
        (lambda: zero_shot.class_embeddings(lambda t: jnp.ones((1, 2 + len(t[0]))), ["a", "bb"]), r"must return shape \(1, 3\).*'bb', got \(1, 4\)"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 4)), L + 1), r"`labels` must lie in \[0, 3\)"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 5)), L), r"`image_emb` and `class_emb` must have the same feature size"),
        (lambda: zero_shot.zero_shot_accuracy(E, np.ones((3, 4)), L, top_k=0), r"`top_k` must be a positive integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
