"""Multistage Contrastive Learning as a training recipe (issue 8; jaxcl/train/mcl.py).

"Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
2024): stage 1 is SimCLR; a later stage clusters the earlier stages' features, restricts negatives to
the anchor's cluster, and is evaluated on the concatenation of every stage's features.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxcl.data import digits, sources
from jaxcl.train import devices, evaluation, loop, mcl, validation
from jaxcl.train import state as state_lib
from tests.helpers import final_state, load_recipe, tiny


@pytest.fixture(scope="module")
def stage_one(data_dir, tmp_path_factory):
  """A finished stage 1 (the SimCLR recipe, 2 steps)."""
  workdir = str(tmp_path_factory.mktemp("mcl_stage1"))
  loop.train_and_evaluate(tiny(load_recipe("simclr_digits"), data_dir, steps=2), workdir, progress=False)
  return workdir


def _stage_two(data_dir, stage_one, clusters, steps=4):
  config = tiny(load_recipe("mcl_digits"), data_dir, steps=steps)
  config.mcl.previous_stages = stage_one
  config.mcl.num_clusters = clusters
  return config


def _losses(workdir):
  return [r["loss"] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]


def test_mcl_config_errors(data_dir, stage_one, tmp_path):
  config = tiny(load_recipe("mcl_digits"), data_dir)
  with pytest.raises(ValueError, match=r"needs `config.mcl.previous_stages`.*got none"):
    validation.validate_config(config, data=False)
  config.mcl.previous_stages = f"{stage_one},{tmp_path}/nowhere"
  with pytest.raises(ValueError, match=r"names '.*nowhere', which has no checkpoints/ folder"):
    validation.validate_config(config, data=False)
  config.mcl.previous_stages = stage_one
  config.mcl.num_clusters = 0
  with pytest.raises(ValueError, match=r"`config.mcl.num_clusters` must be >= 1, got 0"):
    validation.validate_config(config, data=False)
  config.mcl.num_clusters = 4
  config.method = "dcl"
  with pytest.raises(ValueError, match=r"got 'mcl_nt_xent', which works with the methods \('simclr',\)"):
    validation.validate_config(config, data=False)
  plain = tiny(load_recipe("simclr_digits"), data_dir)
  plain.mcl.previous_stages = stage_one
  with pytest.raises(ValueError, match=r"is for `config.loss.name='mcl_nt_xent'`, got loss 'nt_xent'"):
    validation.validate_config(plain, data=False)
  other_model = _stage_two(data_dir, stage_one, 4)
  other_model.model.projection_dims = (32, 8)
  with pytest.raises(ValueError, match=r"every MCL stage must use the same `config.model`"):
    loop.train_and_evaluate(other_model, str(tmp_path / "bad"), progress=False)


def test_an_unfinished_earlier_stage_is_an_error(data_dir, tmp_path):
  first = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  stage = str(tmp_path / "stage1")
  assert loop.train_and_evaluate(first, stage, progress=False, stop_at=2)["stopped"]  # 2 of 4 steps
  config = _stage_two(data_dir, stage, 4)
  with pytest.raises(ValueError, match=re.escape(
      f"`config.mcl.previous_stages` names '{stage}', which has not finished: its newest checkpoint "
      "is step 2, and it has no results.json (a run writes it when it reaches its `total_steps`, the step "
      "expected).")):
    loop.train_and_evaluate(config, str(tmp_path / "stage2"), progress=False)
  assert not (tmp_path / "stage2").exists()  # refused before anything was made
  loop.train_and_evaluate(first, stage, progress=False)  # the stage finishes
  assert mcl.stage_final_step(stage) == 4
  validation.validate_config(config, data=False)
  # its final checkpoint moved away (e.g. quarantined as unreadable): the newest is step 2 again
  os.rename(f"{stage}/checkpoints/4", tmp_path / "aside")
  with pytest.raises(ValueError, match=re.escape(
      f"names '{stage}', which has not finished: its newest checkpoint is step 2, expected step 4 (the "
      "final step of its results.json)")):
    validation.validate_config(config, data=False)


def test_one_cluster_ring_stage_trains_like_nt_xent_and_resumes(data_dir, stage_one, tmp_path):
  # Identity: one cluster leaves every negative in, so stage 2 is the SimCLR run of the same seed; the
  # stage runs its loss as a ring over the 8 devices, is stopped after 2 steps and resumed (its clusters
  # come back from the checkpoint).
  steps = 4
  plain = tiny(load_recipe("simclr_digits"), data_dir, steps=steps)
  plain.eval.at_end = True
  want = loop.train_and_evaluate(plain, str(tmp_path / "plain"), progress=False)
  config = _stage_two(data_dir, stage_one, 1, steps)
  config.eval.at_end = True  # with the earlier stage's features
  config.loss.impl = "ring"
  assert loop.train_and_evaluate(config, str(tmp_path / "mcl"), progress=False, stop_at=2)["stopped"]
  got = loop.train_and_evaluate(config, str(tmp_path / "mcl"), progress=False)
  np.testing.assert_allclose(_losses(tmp_path / "mcl"), _losses(tmp_path / "plain"), rtol=1e-4)
  # the ring run's parameters differ from the plain run's by float32 rounding: a near-tie may flip a vote
  assert got["knn_accuracy_this_stage"] == pytest.approx(want["knn_accuracy"], abs=3 / 359)
  assert 0.0 <= got["knn_accuracy"] <= 1.0 and "knn_accuracy_this_stage" not in want


def test_stage_two_clusters_are_the_kmeans_of_stage_one_features(data_dir, stage_one, tmp_path):
  clusters = 4
  config = _stage_two(data_dir, stage_one, clusters, steps=2)
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  ids = final_state(config, str(tmp_path), 2).method_state["cluster_ids"]
  assert ids.shape == (1800,) and ids.sharding.spec == P(devices.BATCH_AXES)  # 1797 digit ids, padded
  ids = np.asarray(ids)

  # Independently: stage 1's own final state, its features of the train split, k-means with key(seed, 0).
  first = tiny(load_recipe("simclr_digits"), data_dir, steps=2)
  state = final_state(first, stage_one, 2)
  setup = state_lib.build_setup(first)
  train = sources.load_arrays(first.data, "train")
  features = evaluation.embed_images(first, setup, state_lib.variables(state), train["image"])["features"]
  # the run streamed the split (mcl.FEATURE_BATCH at a time): the very same features and ids
  embed = lambda variables, images: evaluation.embed_images(first, setup, variables, images)["features"]  # noqa: E731
  _, batches = sources.split_batches(first.data, "train", mcl.FEATURE_BATCH)
  streamed, streamed_ids = mcl.split_features([state_lib.variables(state)], embed, batches)
  np.testing.assert_array_equal(streamed[0], features)
  np.testing.assert_array_equal(streamed_ids, train["index"])
  want = mcl.stage_clusters(features, clusters, config.mcl.kmeans_iters,
                            jax.random.fold_in(jax.random.key(config.seed), 0))
  # The same partition of the train examples (mcl_cluster_ids renumbers the clusters) ...
  got = ids[train["index"]]
  pairs = {(int(a), int(b)) for a, b in zip(got, want)}
  assert len(pairs) == len(set(got)) == len(set(want.tolist())) and 2 <= len(pairs) <= clusters
  # ... and the ids outside it (the test split, the padding) are 0.
  outside = np.setdiff1d(np.arange(1800), train["index"])
  assert len(outside) == 1800 - len(train["index"]) > 0 and not np.any(ids[outside])
  assert len(train["index"]) < digits.NUM_EXAMPLES
