"""jaxcl.train.loop end to end: a run resumes exactly where an uninterrupted one ends, writes its
outputs, evaluates once per finished step, never waits on the step it just dispatched, and survives
a kill -9 every 20 steps (the soak test)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxcl.train import devices, loop
from jaxcl.train import step as step_lib
from tests.helpers import final_state, load_recipe, ROOT, tiny


@pytest.mark.parametrize("recipe,grad_cache_chunks", [("moco_digits", 1), ("simclr_digits", 2)])
def test_resume_gives_identical_parameters(recipe, grad_cache_chunks, data_dir, tmp_path):
  """A run stopped after 3 of 6 steps (as a preemption would) and resumed ends exactly where the
  uninterrupted run does: the parameters and the method state (MoCo: the EMA target network, the queue
  of keys and its pointer), with and without gradient caching."""
  def config():
    c = tiny(load_recipe(recipe), data_dir, steps=6)
    c.grad_cache_chunks = grad_cache_chunks
    return c

  straight = config()
  loop.train_and_evaluate(straight, str(tmp_path / "straight"), progress=False)
  interrupted = config()
  stopped = loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False, stop_at=3)
  assert stopped == {"step": 3, "stopped": True}
  loop.train_and_evaluate(interrupted, str(tmp_path / "resumed"), progress=False)

  a, b = (final_state(config(), str(tmp_path / w), 6) for w in ("straight", "resumed"))
  if recipe == "moco_digits":
    assert set(a.method_state) == {"target", "queue", "queue_ptr"}
    assert int(a.method_state["queue_ptr"]) == 6 * 16 % 64
  for x, y in zip(jax.tree.leaves((a.params, a.method_state)), jax.tree.leaves((b.params, b.method_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_outputs_of_a_run(data_dir, tmp_path):
  # The MLP encoder (the recipe's ResNet-18: trained in tests/test_plan.py's compile and the remat tests;
  # here its evaluation with the baselines embedded every split three times, the suite's costliest run).
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  config.eval.at_end = True
  config.eval.baselines = True
  config.eval.linear_probe = True
  results = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["knn_accuracy"] == pytest.approx(results["knn_accuracy"])
  # Alignment of two augmented views (>= 0, <= 4 for unit vectors) and uniformity (in [-4t, 0] = [-8, 0]).
  assert 0.0 <= saved["alignment"] <= 4.0 and -8.0 <= saved["uniformity"] <= 0.0
  for baseline in ("random_init", "raw_pixels"):
    assert set(saved["baselines"][baseline]) >= {"knn_accuracy", "linear_probe_accuracy"}
  for png in ("loss.png", "embedding.png"):
    assert (tmp_path / png).stat().st_size > 1000
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 4]


def test_rerunning_a_finished_run_keeps_one_evaluation_row_and_exit_statuses(data_dir, tmp_path):
  from jaxcl import main
  from jaxcl.train import metrics

  config = tiny(load_recipe("simclr_digits"), data_dir, steps=4)
  config.eval.at_end = True
  stopped = loop.train_and_evaluate(config, str(tmp_path), progress=False, stop_at=2)  # as a preemption
  assert main.exit_status(stopped) == main.PREEMPTED_EXIT_STATUS == 75
  finished = loop.train_and_evaluate(config, str(tmp_path), progress=False)
  assert main.exit_status(finished) == 0
  again = loop.train_and_evaluate(config, str(tmp_path), progress=False)  # finds step 4: evaluates again
  assert main.exit_status(again) == 0 and again["knn_accuracy"] == finished["knn_accuracy"]
  records = metrics.read_metrics(str(tmp_path))
  evaluations = [r for r in records if "eval/knn_accuracy" in r]
  assert [r["step"] for r in evaluations] == [4]  # one row, not one per run
  assert evaluations[0]["eval/knn_accuracy"] == again["knn_accuracy"]
  assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_no_host_sync_on_the_step_just_dispatched(data_dir, tmp_path, monkeypatch):
  """The host reads step s's outputs only after step s+1 is dispatched, except before a checkpoint (or an
  evaluation, or the end), and the batch of step s+1 is put on the devices before step s is read."""
  events, step_of = [], {}
  jit_train_step, read_metrics, to_global = step_lib.jit_train_step, loop.read_metrics, devices.to_global

  def recording_compile(*args):
    step_fn = jit_train_step(*args)

    def dispatch(state, batch):
      state, m = step_fn(state, batch)
      step_of[id(m["finite"])] = n = sum(e[0] == "dispatch" for e in events) + 1
      events.append(("dispatch", n))
      return state, m

    return dispatch

  def recording_read(m):
    events.append(("read", step_of[id(m["finite"])]))
    return read_metrics(m)

  def recording_to_global(batch, mesh):
    events.append(("batch", sum(e[0] == "batch" for e in events) + 1))
    return to_global(batch, mesh)

  monkeypatch.setattr(step_lib, "jit_train_step", recording_compile)
  monkeypatch.setattr(loop, "read_metrics", recording_read)
  monkeypatch.setattr(devices, "to_global", recording_to_global)
  config = tiny(load_recipe("simclr_digits"), data_dir, steps=6)
  config.checkpoint_every = 3
  config.eval.at_end = True  # its batches come after the training's
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  b, d, r = (lambda n, kind=kind: (kind, n) for kind in ("batch", "dispatch", "read"))
  training = [b(1), d(1), b(2), d(2), b(3), r(1), d(3), b(4), r(2), r(3),  # r(3): checkpoint 3
              d(4), b(5), d(5), b(6), r(4), d(6), r(5), r(6)]
  assert events[:len(training)] == training
  assert {kind for kind, _ in events[len(training):]} == {"batch"}  # the evaluation's (streamed) batches
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [3, 6]


# ------------------------------------------------------------------------------------------- soak
@pytest.mark.slow
def test_soak_kill_9_and_resume_ends_bit_identical(tmp_path):
  """The short version of experiments/soak_resume.py: 40 steps, a kill -9 late in the first 20 and a
  restart that finishes (random moments and a kill during a checkpoint write:
  tests/train/test_checkpoints.py)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("soak_resume", os.path.join(ROOT, "experiments", "soak_resume.py"))
  soak = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(soak)
  r = soak.soak(steps=40, every=20, checkpoint_every=5, root=str(tmp_path), seed=0, verbose=False)
  assert not r["problems"], soak.report(r)
  assert [k["killed_at"] is not None for k in r["kills"]] == [True, False]
  assert not r["mismatched"] and r["arrays"] > 10
