"""Pod plans: the paper-scale recipes compiled for TPU slices with `jaxcl.plan` (issue 16, item 5).

For CLIP ViT-B/16 at global batch 32,768 and 1,048,576 (the latter with gradient caching too; and
2,097,152 and 3,145,728 with it on v5e-64), SigLIP B/16 at 32,768 and SimCLR ResNet-50 at 4,096, on
v5e-64 (`v5e:8x8`), v5p-128 (`v5p:4x4x4`, 64 chips) and v5e-256 (`v5e:16x16`): the per-chip memory
of the real train step with the loss left to GSPMD (`loss.impl="dense"`: XLA shards the (B, B)
similarity matrix as it sees fit) and with the engine jaxcl chooses (the recipe's `impl="auto"`: a
sharded engine with the Pallas kernels), whether it fits, and the largest global batch that fits with
the chosen engine (`jaxcl.plan.max_batch`, bisection to within 1/4). Every number is the XLA TPU
compiler's (libtpu, run on this CPU): compiled, not measured on a chip. A program whose temporaries
exceed HBM is refused by the compiler; its row shows the compiler's figure for the temporaries.

Each compile runs `python -m jaxcl.plan` in a subprocess and is appended to
`results/pod_plans.jsonl` as soon as it finishes; a second run reads the plans already made and only
compiles the missing ones, so the experiment can be stopped and started again (a full-size step
compiles in 1-5 minutes on a 2-core CPU).

    python experiments/pod_plans.py                   # everything (about 40 compiles)
    python experiments/pod_plans.py --no-max-batch    # the table without the largest-batch searches
    python experiments/pod_plans.py --report          # only rewrite results/pod_plans.md
    python experiments/pod_plans.py --no-grid --search siglip_vitb16@v5p:4x4x4   # one search

Writes `results/pod_plans.jsonl` and `results/pod_plans.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from experiments import _runs  # noqa: E402
from jaxcl import plan  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
PLANS = os.path.join(RESULTS, "pod_plans.jsonl")
ROWS = (("clip_vitb16", 32768), ("clip_vitb16", 1048576), ("siglip_vitb16", 32768), ("simclr_r50", 4096))
SLICES = {"v5e-64": "v5e:8x8", "v5p-128": "v5p:4x4x4", "v5e-256": "v5e:16x16"}
CHIPS = {"v5e:8x8": 64, "v5p:4x4x4": 64, "v5e:16x16": 256}
ENGINES = {"dense": {"loss.impl": "dense"}, "chosen": {}}
# Gradient caching (`config.grad_cache_chunks`) for batches whose encoders' activations do not fit: the
# chunk count that leaves CHUNK_ROWS examples per device in each chunk.
CHUNK_ROWS = 256
CACHED_ROWS = (("clip_vitb16", 1048576),)
# Beyond the table: larger batches with gradient caching on one slice (recipe, global batch, topology).
CACHED_BEYOND = (("clip_vitb16", 2097152, "v5e:8x8"), ("clip_vitb16", 3145728, "v5e:8x8"))
TOLERANCE = 1 / 4
GIB = 1 << 30


def _key(recipe: str, topology: str, overrides: dict) -> str:
  return json.dumps({"recipe": recipe, "topology": topology, **overrides}, sort_keys=True)


def load() -> dict[str, dict]:
  """The plans made so far: key -> {"plan": the planner's JSON or None, "error": its one-line error}."""
  made = {}
  if os.path.exists(PLANS):
    with open(PLANS) as f:
      for line in f:
        record = json.loads(line)
        made[record["key"]] = record
  return made


def compile_plan(recipe: str, topology: str, overrides: dict, made: dict) -> dict:
  """The plan of `recipe` on `topology` with `overrides` (dotted config keys): from `made`, else
  compiled by `python -m jaxcl.plan` in a subprocess and appended to the results file."""
  key = _key(recipe, topology, overrides)
  if key in made:
    return made[key]
  args = [sys.executable, "-m", "jaxcl.plan", f"--config=configs/{recipe}.py", f"--topology={topology}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  start = time.time()
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
  seconds = time.time() - start
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines:
    record = {"key": key, "plan": json.loads(lines[-1]), "error": None}
  else:
    error = [l for l in proc.stderr.strip().splitlines() if l.startswith("jaxcl.plan: error")]
    record = {"key": key, "plan": None,
              "error": error[-1] if error else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
  record["compile_seconds"] = round(seconds, 1)
  record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
  with open(PLANS, "a") as f:
    f.write(json.dumps(record) + "\n")
  made[key] = record
  fits = record["plan"]["fits"] if record["plan"] else None
  print(f"{recipe} {topology} {overrides}: fits={fits} ({seconds:.0f} s){' ' + record['error'] if record['error'] else ''}",
        flush=True)
  return record


def largest_batch(recipe: str, topology: str, made: dict) -> tuple[int, int] | str:
  """(largest global batch found to fit, smallest found not to) with the chosen engine, or the error."""

  def planner(config, topology):
    record = compile_plan(recipe, topology, {"batch_size": int(config.batch_size)}, made)
    if record["plan"] is None:
      raise plan.PlanError(record["error"])
    return record["plan"]

  try:
    best, over = plan.max_batch(_runs.recipe(recipe), topology, tolerance=TOLERANCE, planner=planner)
  except plan.PlanError as e:
    return str(e)
  return best["global_batch"], over["global_batch"]


def _memory(record: dict | None) -> str:
  """'12.3 GiB' (fits) / '**refused**: 26.7 GiB temporaries' / the error."""
  if record is None:
    return "not compiled"
  p = record["plan"]
  if p is None:
    return f"error: {record['error']}"
  c = p["per_chip"]
  if p["compiler_refused"] is not None:
    return f"no: temporaries {c['temp_bytes'] / GIB:.1f} GiB > {p['compiler_refused']['available_bytes'] / GIB:.2f}"
  return f"{'yes' if p['fits'] else 'no'}: {c['total_bytes'] / GIB:.2f} GiB"


def grad_cache_chunks(topology: str, batch: int) -> int:
  """The `config.grad_cache_chunks` that leaves `CHUNK_ROWS` examples per device in each chunk."""
  return max(batch // CHIPS[topology] // CHUNK_ROWS, 1)


def engine(recipe: str, topology: str, batch: int) -> str:
  """The sharded engine the image-text loss's `impl="auto"` picks under the trainer's mesh
  (`jaxcl.ops.sharded.resolve` of each device's rows × the global batch and the embedding width); ""
  for SimCLR (its two-view loss is not an image-text pair)."""
  from jaxcl.ops import sharded

  if not recipe.startswith(("clip", "siglip")):
    return ""
  rows, dim = batch // CHIPS[topology], int(_runs.recipe(recipe).model.embed_dim)
  return sharded.resolve("auto", rows, batch, dim)


def _kernels(record: dict | None) -> str:
  p = record and record["plan"]
  if not p or p["compiler_refused"] is not None:
    return ""
  return f" ({p['kernel_calls']['mosaic']} Mosaic calls)"


def report(made: dict, searched: dict) -> str:
  lines = [
      "# Pod plans (compiled for TPU slices on a CPU, not measured on chips)",
      "",
      "`python experiments/pod_plans.py` (see its docstring). Per chip: the step's arguments + temporaries"
      " + outputs not aliased to donated arguments, as the XLA TPU compiler (libtpu) reports them for the"
      " recipe's real train step (`jaxcl.plan`); \"no: temporaries X\" is the compiler refusing the"
      " program because its temporaries alone exceed the chip's HBM (v5e 16 GiB, v5p 95 GiB per chip)."
      " Dense: `loss.impl=\"dense\"`, the (B, B) matrix left to GSPMD. Chosen: the recipe's default"
      " (`impl=\"auto\"`; the engine it picks for these shapes, and the Pallas kernel calls in the compiled"
      " step). Gradient caching: `grad_cache_chunks` so that a chunk holds 256 examples per chip. Largest: the largest global batch with the chosen engine, bisected to within"
      " 1/4 (fits ≤ largest < does not fit).",
      "",
      "| recipe | global batch | slice | dense: fits, per chip | chosen: fits, per chip | chosen engine | chosen + gradient caching | largest batch that fits (chosen) | commits |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for recipe, batch in ROWS:
    for name, topology in SLICES.items():
      dense = made.get(_key(recipe, topology, {"batch_size": batch, **ENGINES["dense"]}))
      chosen = made.get(_key(recipe, topology, {"batch_size": batch}))
      k = grad_cache_chunks(topology, batch)
      cached = made.get(_key(recipe, topology, {"batch_size": batch, "grad_cache_chunks": k}))
      cached_text = f"{_memory(cached)} ({k} chunks)" if cached else ""
      found = searched.get((recipe, topology))
      largest = ("not searched" if found is None else found if isinstance(found, str)
                 else f"{found[0]:,} (not {found[1]:,})")
      commits = ", ".join(dict.fromkeys(r.get("commit", "?") for r in (dense, chosen, cached) if r))
      lines.append(f"| {recipe} | {batch:,} | {name} (`{topology}`) | {_memory(dense)} | {_memory(chosen)} | "
                   f"{engine(recipe, topology, batch)}{_kernels(chosen)} | {cached_text} | {largest} | {commits} |")
  for recipe, batch, topology in CACHED_BEYOND:
    k = grad_cache_chunks(topology, batch)
    record = made.get(_key(recipe, topology, {"batch_size": batch, "grad_cache_chunks": k}))
    if record:
      lines += ["", f"{recipe} at {batch:,} on `{topology}` with gradient caching ({k} chunks): "
                    f"{_memory(record)} ({record.get('commit', '?')})."]
  seconds = sum(r.get("compile_seconds") or 0 for r in made.values())
  lines += ["", f"{len(made)} compiles, {seconds / 60:.0f} minutes of compiling in all."]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch searches")
  parser.add_argument("--no-grid", action="store_true",
                      help="only the largest-batch searches (e.g. in a second process beside the grid)")
  parser.add_argument("--report", action="store_true", help="only rewrite the table from the plans made")
  parser.add_argument("--search", nargs="*", metavar="RECIPE@TOPOLOGY",
                      help="run only these largest-batch searches (e.g. simclr_r50@v5p:4x4x4); the "
                           "others are replayed from the plans made")
  args = parser.parse_args()
  os.makedirs(RESULTS, exist_ok=True)
  made, searched = load(), {}
  if not args.report and not args.no_grid:
    for recipe, batch in ROWS:
      for topology in SLICES.values():
        for overrides in ENGINES.values():
          compile_plan(recipe, topology, {"batch_size": batch, **overrides}, made)
    for recipe, batch in CACHED_ROWS:
      for topology in SLICES.values():
        compile_plan(recipe, topology, {"batch_size": batch, "grad_cache_chunks": grad_cache_chunks(topology, batch)},
                     made)
    for recipe, batch, topology in CACHED_BEYOND:
      compile_plan(recipe, topology, {"batch_size": batch, "grad_cache_chunks": grad_cache_chunks(topology, batch)},
                   made)
  if not args.no_max_batch:
    for topology in SLICES.values():
      for recipe in dict.fromkeys(r for r, _ in ROWS):
        run = not args.report and (args.search is None or f"{recipe}@{topology}" in args.search)
        searched[(recipe, topology)] = (largest_batch(recipe, topology, made) if run
                                        else _cached_search(recipe, topology, made))
  table = report(made, searched)
  with open(os.path.join(RESULTS, "pod_plans.md"), "w") as f:
    f.write(table)
  print(table)


def _cached_search(recipe: str, topology: str, made: dict):
  """The largest-batch search replayed over the plans made (None where it would need a compile)."""

  def planner(config, topology):
    key = _key(recipe, topology, {"batch_size": int(config.batch_size)})
    if key not in made or made[key]["plan"] is None:
      raise LookupError(key)
    return made[key]["plan"]

  try:
    best, over = plan.max_batch(_runs.recipe(recipe), topology, tolerance=TOLERANCE, planner=planner)
  except LookupError:  # the search stopped before the end: the largest batch found to fit so far
    fitting = [json.loads(k)["batch_size"] for k, r in made.items()
               if r["plan"] and r["plan"]["fits"] and set(json.loads(k)) == {"recipe", "topology", "batch_size"}
               and json.loads(k)["recipe"] == recipe and json.loads(k)["topology"] == topology]
    return f">= {max(fitting):,} (search not finished)" if fitting else None
  except plan.PlanError as e:
    return str(e)
  return best["global_batch"], over["global_batch"]


if __name__ == "__main__":
  main()
