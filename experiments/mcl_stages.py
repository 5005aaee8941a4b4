"""Multistage Contrastive Learning on the digits: do later stages add what SimCLR suppressed?

"Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
2024). MCL: stage 1 is the SimCLR recipe; stage t trains a fresh model whose negatives are restricted to
the anchor's cluster in the k-means clusterings of stages 1..t−1 (configs/mcl_digits.py), and the
representation is the concatenation of the stages' backbone features. The control is the same number
of independently seeded SimCLR runs with their features concatenated (an ensemble of the same size).
Every run has the same steps, width and schedule.

    python experiments/mcl_stages.py                      # about 30 minutes per seed on a 2-core CPU
    python experiments/mcl_stages.py --steps 400 --width 32 --stages 3 --seeds 0,1,2

Writes experiments/results/mcl_stages.md and .png; runs live in --runs (resumable).
"""

from __future__ import annotations

import argparse
import os

import _runs
from jaxcl.train import devices, evaluation, mcl
from jaxcl.train import state as state_lib


def concatenated_knn(config, workdirs: list[str]) -> dict:
  """kNN accuracy of the concatenated backbone features of the final models in `workdirs` (one
  model config), with the loop's own evaluation (`evaluation.evaluate(..., earlier=...)`)."""
  setup = state_lib.build_setup(config, mesh=devices.make_mesh(config))
  variables = mcl.final_variables(workdirs, *state_lib.state_shardings(config, setup, setup.mesh))
  return evaluation.evaluate(config, setup, variables[-1], earlier=tuple(variables[:-1]))


def run_seed(args, seed: int) -> tuple[list, list]:
  """(own, concatenated) kNN accuracy per stage of MCL and of independently seeded SimCLR runs."""
  runs = os.path.join(args.runs, f"seed{seed}")
  mcl_dirs, mcl_rows = [], []
  for t in range(1, args.stages + 1):
    workdir = os.path.join(runs, f"mcl_stage{t}")
    if t == 1:
      r = _runs.train("simclr_digits", workdir, _runs.short_run(args.steps, args.width, seed))
      own, joint = r["knn_accuracy"], r["knn_accuracy"]
    else:
      r = _runs.train("mcl_digits", workdir, dict(
          _runs.short_run(args.steps, args.width, seed), **{"mcl.previous_stages": ",".join(mcl_dirs),
                                     "mcl.num_clusters": args.clusters}))
      own, joint = r["knn_accuracy_this_stage"], r["knn_accuracy"]
    mcl_dirs.append(workdir)
    mcl_rows.append((own, joint))

  seed_dirs, seed_rows = [], []
  for t in range(1, args.stages + 1):  # run 1 is MCL's stage 1
    workdir = mcl_dirs[0] if t == 1 else os.path.join(runs, f"simclr_run{t}")
    r = _runs.train("simclr_digits", workdir, _runs.short_run(args.steps, args.width, seed + 1000 * (t - 1)))
    seed_dirs.append(workdir)
    config = _runs.with_overrides(_runs.recipe("simclr_digits"), _runs.short_run(args.steps, args.width, seed))
    joint = r["knn_accuracy"] if t == 1 else concatenated_knn(config, seed_dirs)["knn_accuracy"]
    seed_rows.append((r["knn_accuracy"], joint))
  return mcl_rows, seed_rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--stages", type=int, default=3)
  p.add_argument("--clusters", type=int, default=10)
  p.add_argument("--seeds", default="0,1", help="comma-separated; stage 1 of MCL is SimCLR run 1 of each seed")
  p.add_argument("--runs", default=os.path.join(_runs.ROOT, "runs", "mcl_stages"))
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {s: run_seed(args, s) for s in seeds}
  mean = lambda xs: sum(xs) / len(xs)
  rows = []
  for t in range(args.stages):
    cols = [mean([results[s][which][t][k] for s in seeds]) for which in (0, 1) for k in (0, 1)]
    rows.append([t + 1] + cols)
  gains = {s: results[s][0][-1][1] - results[s][1][-1][1] for s in seeds}
  per_seed = "; ".join(f"seed {s}: {g:+.3f}" for s, g in gains.items())
  text = (
      "# Multistage Contrastive Learning vs independent SimCLR runs (digits)\n\n"
      f"simclr_digits / mcl_digits (batch 256, τ = 0.2, LARS), {args.steps} steps per stage, ResNet-18 width "
      f"{args.width}, {args.clusters} k-means clusters per earlier stage, seeds {seeds}; {_runs.machine()}. "
      f"Command: `python experiments/mcl_stages.py --steps {args.steps} --width {args.width} --stages "
      f"{args.stages} --clusters {args.clusters} --seeds {args.seeds}`.\n\n"
      "Stage t of MCL (stage 1 = SimCLR) against the t-th independently seeded SimCLR run (run 1 is the "
      "same run as MCL stage 1): kNN accuracy of that model's own backbone features, and of the "
      f"concatenation of stages / runs 1..t; mean over the {len(seeds)} seeds.\n\n"
      + _runs.markdown_table(
          ["stage t", "MCL own", "MCL concat 1..t", "SimCLR run t own", "SimCLR runs concat 1..t"], rows)
      + f"\n\nAfter {args.stages} stages, MCL's concatenation minus the concatenation of {args.stages} "
      f"independent SimCLR runs: {per_seed}. Differences of a percent or two are within run-to-run noise "
      "at this scale.\n"
  )
  plt = _runs.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  stages = list(range(1, args.stages + 1))
  for (label, style, which, k) in (("MCL, concat 1..t", "o-", 0, 1), ("MCL stage t alone", "o--", 0, 0),
                                   ("SimCLR runs, concat 1..t", "s-", 1, 1), ("SimCLR run t alone", "s--", 1, 0)):
    ax.plot(stages, [r[1 + 2 * which + k] for r in rows], style, label=label)
  ax.set(xlabel="stage / run t", ylabel=f"kNN accuracy (mean of {len(seeds)} seeds)", xticks=stages,
         title="MCL on simclr_digits")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _runs.write("mcl_stages", text, fig)


if __name__ == "__main__":
  main()
