"""README.md and docs/: the generated API reference is up to date, every ```python block runs, every
shell command names real config keys and recipes, and the TPU guide names only config keys and
environment variables the code reads."""

from __future__ import annotations

import doctest
import glob
import importlib.util
import os
import re

import pytest

from jaxcl.train.config import OPTIONAL_KEYS
from jaxcl.train.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# The prose documents (docs/api.md is generated: its ```python blocks are the signatures of the code,
# checked by test_api_reference_is_up_to_date, and its examples are doctests that pytest runs in jaxcl/).
DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(DOCS, "*.md")) if not p.endswith("api.md"))


def _read(*parts: str) -> str:
  with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
    return f.read()


def _build_api():
  spec = importlib.util.spec_from_file_location("build_api", os.path.join(DOCS, "build_api.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_reference_is_up_to_date():
  build = _build_api()
  assert _read("docs", "api.md") == build.render(), (
      "docs/api.md is out of date with the docstrings: run `python docs/build_api.py` and commit it.")


def test_api_reference_covers_every_public_name():
  import jaxcl.data
  import jaxcl.eval
  import jaxcl.losses
  import jaxcl.models
  import jaxcl.ops

  text = _build_api().render()
  for module in (jaxcl.losses, jaxcl.ops, jaxcl.eval, jaxcl.models, jaxcl.data):
    for name in module.__all__:
      assert f"### `{module.__name__}.{name}`" in text, f"{module.__name__}.{name} is not in docs/api.md"
  # Signatures are shown unquoted and without memory addresses (stable across runs).
  assert "'jax.Array'" not in text and " at 0x" not in text
  assert "clip(\n    image: jax.Array," in text


def _fenced_blocks(name: str) -> list[tuple[str, str]]:
  """(language, code) of every fenced block of the document `name`, in order."""
  return re.findall(r"^```(\S*)\n(.*?)^```\s*$", _read(name), flags=re.S | re.M)


def _run_python_blocks(name: str) -> dict:
  """Runs every ```python block of `name`, in order, in one namespace (returned)."""
  namespace: dict = {"__name__": f"doc:{name}"}
  for n, (language, block) in enumerate(_fenced_blocks(name)):
    if language == "python":
      exec(compile(block, f"{name}[python block {n}]", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_documents_are_found():
  assert {"README.md", "docs/distributed.md", "docs/new_loss.md", "docs/pallas.md", "docs/tpu.md"} <= set(DOCUMENTS)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_code_blocks_are_python_shell_or_text(name):
  """A block that cannot run here (a TPU pod launch) is ```bash or ```text, never untagged or python."""
  languages = {language for language, _ in _fenced_blocks(name)}
  assert languages <= {"python", "bash", "text"}, f"{name}: code blocks tagged {sorted(languages)}"


def _has_python(name: str) -> bool:
  return any(language == "python" for language, _ in _fenced_blocks(name))


def test_documents_with_python_blocks():
  assert [n for n in DOCUMENTS if _has_python(n)] == [
      "README.md", "docs/distributed.md", "docs/new_loss.md", "docs/pallas.md"]


@pytest.mark.parametrize("name", [n for n in DOCUMENTS if _has_python(n) and n != "docs/new_loss.md"])  # (below)
def test_python_blocks_run(name):
  """Every ```python block of the document runs, in order, in one namespace (the test session's 8 CPU
  devices serve the sharded examples)."""
  _run_python_blocks(name)


def _known_config_keys() -> set[str]:
  return _config_paths(base_config()) | set(OPTIONAL_KEYS)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_commands_name_real_config_keys_and_recipes(name):
  """Every `--config.KEY` of a document is a key of the config, every `configs/X.py` a recipe."""
  text = _read(name)
  keys = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", text))  # not the KEY placeholder
  unknown = sorted(keys - _known_config_keys())
  assert not unknown, f"{name} names config keys that base_config() lacks: {unknown}"
  recipes = set(re.findall(r"configs/(\w+)\.py", text))
  missing = sorted(r for r in recipes if not os.path.exists(os.path.join(ROOT, "configs", f"{r}.py")))
  assert not missing, f"{name} names recipes that configs/ lacks: {missing}"


def test_new_loss_guide_code_runs():
  """Every ```python block of docs/new_loss.md, in order, in one namespace; then the doctest of the
  worked example's docstring."""
  assert [language for language, _ in _fenced_blocks("docs/new_loss.md")].count("python") >= 5
  namespace = _run_python_blocks("docs/new_loss.md")
  loss = namespace["infonce_fne"]
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder().find(loss, "infonce_fne", globs=dict(namespace)):
    runner.run(test)
  assert runner.summarize(verbose=False).attempted >= 2
  assert runner.summarize(verbose=False).failed == 0


def _config_paths(config, prefix=""):
  out = set()
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.add(path)
    if hasattr(value, "items"):
      out |= _config_paths(value, path + ".")
  return out


def test_tpu_guide_names_real_config_keys_and_environment_variables():
  text = _read("docs", "tpu.md")
  keys = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", text))  # not the KEY placeholder
  keys |= set(re.findall(r"`config\.([a-z_][a-z0-9_.]*[a-z0-9_])`", text))
  assert len(keys) >= 5
  unknown = sorted(keys - _config_paths(base_config()))
  assert not unknown, f"docs/tpu.md names config keys that base_config() lacks: {unknown}"
  main = _read("jaxcl", "main.py")
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
    assert var in text and var in main, var
  recipes = set(re.findall(r"configs/(\w+)\.py", text))
  assert recipes and all(os.path.exists(os.path.join(ROOT, "configs", f"{r}.py")) for r in recipes), recipes


def test_tpu_guide_installs_the_python_it_calls():
  """A shell block that calls a versioned `python3.X` installs it in the same block (or command) first:
  a fresh TPU VM image does not have it."""
  for language, block in _fenced_blocks("docs/tpu.md"):
    if language != "bash":
      continue
    for version in set(re.findall(r"\bpython(3\.\d+)\b", block)):
      install = re.search(rf"apt-get install -y python{re.escape(version)} python{re.escape(version)}-venv", block)
      first_use = re.search(rf"\bpython{re.escape(version)} -m venv", block)
      assert install and first_use and install.start() < first_use.start(), (
          f"docs/tpu.md calls python{version} without installing it first:\n{block}")


def test_tpu_guide_states_the_checkpointing_default():
  """The guide says checkpoints are synchronous unless `async_checkpointing` is set, as the config does."""
  text = _read("docs", "tpu.md")
  assert base_config().async_checkpointing is False
  assert "orbax, async" not in text
  assert "synchronous by\n  default" in text or "synchronous by default" in text
  row = re.search(r"^\| `async_checkpointing` \| (\w+) \|", text, flags=re.M)
  assert row and row.group(1) == str(base_config().async_checkpointing).lower()


def test_cited_documents_are_in_the_repository():
  """Every document a README, guide or experiment cites (`docs/X.md`, a relative markdown link) is a file
  of the repository, none cites the design notes kept outside it, and the design document is
  docs/design.md."""
  cited_by = ["README.md", "CHANGELOG.md", "colab/README.md", "experiments/README.md"]
  cited_by += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]
  cited_by += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))]
  missing = []
  for name in cited_by:
    text = _read(name)
    assert not re.search(r"DESIGN\.md", text), f"{name} cites design notes outside the repository: docs/design.md"
    paths = {os.path.join(ROOT, p) for p in re.findall(r"\bdocs/\w+\.md", text)}
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links, anchors dropped
      if "://" not in link:
        paths.add(os.path.normpath(os.path.join(ROOT, os.path.dirname(name), link)))
    missing += [f"{name} -> {os.path.relpath(p, ROOT)}" for p in sorted(paths) if not os.path.exists(p)]
  assert not missing, missing
  design = _read("docs", "design.md")
  for section in ("## Loss = math × engine", "## The engines", "## The sharded engines", "## The training system",
                  "## Performance protocol"):
    assert section in design, section
