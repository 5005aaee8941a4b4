"""pyproject.toml and the files a release ships: one source for the version, the licence text, the
PEP 561 marker, and a changelog entry for the version."""

from __future__ import annotations

import importlib.metadata
import os
import tomllib

import jaxcl

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
