"""Do two checkouts of jaxcl train the same? For refactors that must not change any number.

Runs every digits recipe (shrunk as tests/helpers.py's `tiny`: 4 steps, batch 16, MLP encoder, on 8
CPU devices) with the jaxcl of a checkout, and writes each run's logged metrics (minus examples/s) and
evaluation to a JSON file; `--compare` reports the recipes whose numbers differ between two such files.

    python experiments/same_results.py --repo /path/to/old/checkout --out /tmp/old.json
    python experiments/same_results.py --repo . --out /tmp/new.json
    python experiments/same_results.py --compare /tmp/old.json /tmp/new.json

(`git worktree add --detach /tmp/old <commit>` makes the old checkout.) About 5 minutes a checkout here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def run(repo: str, out: str) -> None:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  repo = os.path.abspath(repo)
  sys.path.insert(0, repo)  # this checkout's jaxcl and tests, before an installed one
  os.chdir(repo)
  from jaxcl.train import loop  # pylint: disable=import-outside-toplevel
  try:  # pylint: disable=import-outside-toplevel
    from tests.helpers import RECIPES, load_recipe, tiny
  except ImportError:  # a checkout from before the tests mirrored the code
    from tests.test_train import RECIPES, load_recipe, tiny

  data_dir, runs = tempfile.mkdtemp(), {}
  for name in RECIPES:
    if not name.endswith("_digits") or name == "mcl_digits":  # mcl needs an earlier stage
      continue
    workdir = tempfile.mkdtemp()
    results = loop.train_and_evaluate(tiny(load_recipe(name), data_dir), workdir, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logged = [{k: v for k, v in json.loads(line).items() if k != "examples_per_sec"} for line in f]
    runs[name] = {"results": results, "metrics": logged}
  with open(out, "w") as f:
    json.dump(runs, f, indent=1, sort_keys=True, default=str)
  print(f"wrote {out}: {', '.join(runs)}")


def compare(a_path: str, b_path: str) -> int:
  with open(a_path) as f:
    a = json.load(f)
  with open(b_path) as f:
    b = json.load(f)
  differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
  for name in sorted(set(a) | set(b)):
    print(f"{name}: {'DIFFERENT' if name in differ else 'identical'}")
  return 1 if differ else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  parser.add_argument("--out")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
  args = parser.parse_args()
  if args.compare:
    return compare(*args.compare)
  if not args.out:
    parser.error("--out is needed to run the recipes")
  run(args.repo, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
