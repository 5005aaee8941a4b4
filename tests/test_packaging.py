"""pyproject.toml and the files a release ships: one source for the version, the licence text, the
PEP 561 marker, and a changelog entry for the version."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest

import jaxcl
from jaxcl import _extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _read(name: str) -> str:
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def test_version_is_written_once_and_matches_the_installed_metadata():
  project = _pyproject()
  assert "version" not in project["project"], "pyproject.toml must not repeat the version"
  assert "version" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxcl.__version__"}
  assert jaxcl.__version__ == importlib.metadata.version("jaxcl")


def test_license_file_is_the_apache_2_license_the_package_declares():
  project = _pyproject()["project"]
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
  text = _read("LICENSE")
  assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert len(text.split()) > 1500  # the full text, not a pointer to it


def test_type_marker_is_shipped():
  assert os.path.isfile(os.path.join(ROOT, "jaxcl", "py.typed"))
  assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["jaxcl"]


def test_changelog_has_an_entry_for_this_version():
  text = _read("CHANGELOG.md")
  assert "## Unreleased" in text
  assert f"## {jaxcl.__version__}" in text


def test_the_core_install_is_jax_and_numpy_and_the_training_system_an_extra():
  project = _pyproject()["project"]
  assert [d.split(">=")[0] for d in project["dependencies"]] == ["jax", "numpy"]
  canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # PEP 503
  train = {canonical(re.split(r"[\[>=<]", d)[0]) for d in project["optional-dependencies"]["train"]}
  modules = importlib.metadata.packages_distributions()
  named = {canonical(dist) for m in _extras.TRAIN_MODULES for dist in modules.get(m, [])}
  assert named == train, "jaxcl/_extras.py TRAIN_MODULES must name one module of each `train` distribution"
  assert "jaxcl[train" in " ".join(project["optional-dependencies"]["test"])


def test_the_loss_api_imports_nothing_beyond_jax():
  """`import jaxcl.losses` (and the engines, gradient caching, compile targets) loads no module that jax
  itself (with Pallas) does not: no flax, optax, tfds, grain, ..."""
  code = (
      "import sys\n"
      "import jax, jax.numpy, jax.experimental.pallas, jax.experimental.pallas.tpu\n"
      "before = {m.split('.')[0] for m in sys.modules}\n"
      "import jaxcl, jaxcl.losses, jaxcl.ops, jaxcl.grad_cache, jaxcl.targets\n"
      "print(sorted({m.split('.')[0] for m in sys.modules} - before))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "['jaxcl']", out.stdout


def test_the_training_system_says_which_extra_to_install(monkeypatch):
  monkeypatch.setattr(_extras, "TRAIN_MODULES", _extras.TRAIN_MODULES + ("jaxcl_no_such_module",))
  with pytest.raises(ImportError, match=r"^jaxcl.models is part of jaxcl's training system, which needs "
                                        r"`pip install 'jaxcl\[train\]'` \(not installed: jaxcl_no_such_module\)\.$"):
    _extras.require_train_extra("jaxcl.models")
