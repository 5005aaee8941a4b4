"""jaxcl.eval.retrieval: recall@k against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.eval import retrieval
from tests.helpers import unit


def ref_recall(image, text, ks, image_ids=None, text_ids=None):
  """R@k by sorting every row: a hit if some match is among the first k of the descending order."""
  n, m = len(image), len(text)
  image_ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
  text_ids = np.arange(m) if text_ids is None else np.asarray(text_ids)
  s = unit(image) @ unit(text).T
  out = {}
  for name, sim, q_ids, i_ids in (
      ("image_to_text", s, image_ids, text_ids),
      ("text_to_image", s.T, text_ids, image_ids),
  ):
    for k in ks:
      hits = [np.any(q_ids[i] == i_ids[np.argsort(-row, kind="stable")[:k]]) for i, row in enumerate(sim)]
      out[f"{name}_R@{k}"] = float(np.mean(hits))
  return out


def test_retrieval_recall_known_ranks():
  # Image i is e_i; text rows are permutations of (4, 3, 2, 1) (equal norms), so s_ij ∝ texts[j, i].
  # The matching text's value in each column is 4, 1, 3, 4 -> image→text ranks 0, 3, 1, 0; by rows
  # text→image ranks are also 0, 3, 1, 0.
  images = np.eye(4, dtype=np.float32)
  texts = np.array([[4, 3, 2, 1], [2, 1, 4, 3], [1, 4, 3, 2], [3, 2, 1, 4]], np.float32)
  got = retrieval.retrieval_recall(images, texts, ks=(1, 2, 3, 4))
  want = {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
  for k, v in want.items():
    assert float(got[f"image_to_text_R@{k}"]) == v
    assert float(got[f"text_to_image_R@{k}"]) == v
  assert set(got) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in want}


def test_retrieval_recall_with_ids_is_a_hit_if_any_match_is_in_top_k():
  images = np.eye(2, dtype=np.float32)
  texts = np.array([[1.0, 0.0], [0.2, 1.0], [0.0, 1.0]], np.float32)  # captions 0, 1 of image 0; 2 of 1
  got = retrieval.retrieval_recall(images, texts, ks=(1, 2), image_ids=[0, 1], text_ids=[0, 0, 1])
  assert float(got["image_to_text_R@1"]) == 1.0  # image 0 finds caption 0 first
  # caption 1 looks like image 1 (0.98 vs 0.196): rank 1; the other two rank 0.
  assert float(got["text_to_image_R@1"]) == pytest.approx(2 / 3)
  assert float(got["text_to_image_R@2"]) == 1.0


@pytest.mark.parametrize("chunk", [1024, 3])
def test_retrieval_recall_matches_numpy_reference(chunk):
  rng = np.random.default_rng(12)
  image = rng.standard_normal((20, 8)).astype(np.float32)
  text = (image + 0.8 * rng.standard_normal((20, 8))).astype(np.float32)
  got = retrieval.retrieval_recall(image, text, ks=(1, 3, 5, 10), chunk=chunk)
  want = ref_recall(image, text, (1, 3, 5, 10))
  assert {key: float(v) for key, v in got.items()} == pytest.approx(want, abs=1e-6)
  assert 0 < want["image_to_text_R@1"] < 1
  # Five captions per image, shuffled.
  text_ids = rng.permutation(np.repeat(np.arange(20), 5)).astype(np.int32)
  captions = (image[text_ids] + 1.2 * rng.standard_normal((100, 8))).astype(np.float32)
  got = retrieval.retrieval_recall(
      image, captions, ks=(1, 5), image_ids=np.arange(20), text_ids=text_ids, chunk=chunk
  )
  want = ref_recall(image, captions, (1, 5), np.arange(20), text_ids)
  assert {key: float(v) for key, v in got.items()} == pytest.approx(want, abs=1e-6)


def test_retrieval_recall_ties_count_against_the_match_and_bf16():
  same = np.ones((5, 3), np.float32)
  got = retrieval.retrieval_recall(same, same, ks=(1, 4, 5))
  assert [float(got[f"image_to_text_R@{k}"]) for k in (1, 4, 5)] == [0.0, 0.0, 1.0]
  rng = np.random.default_rng(13)
  image = rng.standard_normal((32, 16)).astype(np.float32)
  text = image + 0.5 * rng.standard_normal((32, 16)).astype(np.float32)
  hi = retrieval.retrieval_recall(image, text, ks=(1, 5))
  lo = retrieval.retrieval_recall(jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16), ks=(1, 5))
  for key in hi:
    assert lo[key].dtype == jnp.float32 and abs(float(lo[key]) - float(hi[key])) <= 2 / 32


# ------------------------------------------------------------------------------------------ bad inputs
E = np.ones((6, 4), np.float32)


L = np.array([0, 1, 2, 0, 1, 2], np.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: retrieval.retrieval_recall(E, np.ones((5, 4))), r"need the same number of rows, got 6 and 5"),
        (lambda: retrieval.retrieval_recall(E, np.ones((6, 3))), r"`image_emb` and `text_emb` must have the same feature size"),
        (lambda: retrieval.retrieval_recall(E, E, ks=(1, 0)), r"`ks\[1\]` must be a positive integer, got 0"),
        (lambda: retrieval.retrieval_recall(E, E, ks=()), r"`ks` must be a non-empty"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L), r"must be given together, got only `image_ids`"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L, text_ids=L + 1), r"`image_ids\[0\] = 0 has none|image_ids\[0\] = 0"),
        (lambda: retrieval.retrieval_recall(E, E, image_ids=L, text_ids=L[:5]), r"`text_ids` must have shape \(6,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
