"""jaxcl.train.evaluation: the streamed evaluation of a training state."""

import jax
import numpy as np
import pytest

from jaxcl.train import devices, evaluation
from jaxcl.train import state as state_lib
from tests.helpers import load_recipe, tiny


@pytest.mark.parametrize("name", ["simclr_digits", "clip_digits"])
def test_streamed_evaluation_equals_the_whole_split_in_memory(name, data_dir):
  """`evaluate` streams the splits a batch at a time, sharded over the 8 devices, and keeps only the
  embeddings; the reference loads both splits whole into host memory and embeds them in one process."""
  from jaxcl import eval as eval_lib
  from jaxcl.data import augment, sources

  config = tiny(load_recipe(name), data_dir)
  config.eval.linear_probe = name == "simclr_digits"
  setup = state_lib.build_setup(config, mesh=devices.make_mesh(config))
  state = jax.jit(lambda k: state_lib.init_state(config, setup, k))(jax.random.key(3))
  variables = state_lib.variables(state)
  got = evaluation.evaluate(config, setup, variables)

  train, test = (sources.load_arrays(config.data, s) for s in ("train", "test"))
  tr, te = (evaluation.embed_images(config, setup, variables, d["image"]) for d in (train, test))
  want = eval_lib.evaluate_embeddings(tr["features"], train["label"], te["features"], test["label"],
                                      num_classes=10, knn_k=20, knn_temperature=config.eval.knn_temperature,
                                      linear_probe=config.eval.linear_probe)
  if name == "clip_digits":
    encode = lambda texts: setup.text.encode_for_eval(setup.model, variables, texts)
    class_emb = eval_lib.class_embeddings(encode, setup.info.class_names, setup.text.templates)
    want["zero_shot_accuracy"] = float(eval_lib.zero_shot_accuracy(te["embedding"], class_emb, test["label"]))
  else:
    views = np.asarray(augment.make_views(jax.random.key(config.seed + 1), test["image"], 2, setup.aug))
    a, b = (evaluation.embed_images(config, setup, variables, v)["projection"] for v in views)
    want.update({k: float(v) for k, v in eval_lib.alignment_uniformity(a, b).items()})
  assert {k for k in got if not k.startswith("_")} == set(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  np.testing.assert_allclose(got["_projection"], te["features"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["_labels"], test["label"])
