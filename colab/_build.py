"""Writes the Colab notebooks colab/NN_*.ipynb from their sources colab/NN_*.py (jupytext percent format).

    python colab/_build.py            # rewrites every colab/NN_*.ipynb from its .py (needs `jupytext`)

The .py files are the notebooks: `# %%` starts a code cell, `# %% [markdown]` a markdown cell (each line
of it commented), and the header between the `# ---` lines holds the notebook's metadata. They are plain
Python (no `!` or `%` lines; pyflakes-clean), so edit them, then regenerate; `tests/test_notebooks.py`
checks that the committed .ipynb files are what this script writes, lints and compiles the sources, and
executes every notebook end to end with tiny settings (the `JAXCL_NB_*` environment variables).

What is written depends on the sources only: no outputs, no jupytext version, and cell ids numbered by
position (`<name>-NN`, the one thing set after jupytext reads a source: nbformat would draw random ids).
"""

from __future__ import annotations

import glob
import os
import sys

import jupytext
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

# The sources' format. comment_magics=False: a comment that reads like a shell command (the install
# cell's `#   !pip install ...` lines) stays a comment instead of becoming one.
SOURCE_FORMAT = {"extension": ".py", "format_name": "percent", "comment_magics": False}

NOTEBOOKS = sorted(os.path.basename(p)[:-3] + ".ipynb" for p in glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))


def source_path(name: str) -> str:
  """colab/NN_x.py, the source of the notebook colab/NN_x.ipynb."""
  return os.path.join(HERE, name[: -len(".ipynb")] + ".py")


def notebook(name: str) -> nbformat.NotebookNode:
  """The notebook `name` (an .ipynb file name) read from its source, with cell ids `<stem>-NN`."""
  with open(source_path(name), encoding="utf-8") as f:
    nb = jupytext.read(f, fmt=SOURCE_FORMAT)
  nb.metadata.pop("jupytext", None)  # the format options just read: not part of the notebook
  stem = name[: -len(".ipynb")]
  for n, cell in enumerate(nb.cells):
    cell.id = f"{stem}-{n:02d}"
  return nb


def render(name: str) -> str:
  """The exact text of colab/<name>: nbformat's JSON (sorted keys, one-space indent) and a final newline."""
  return nbformat.writes(notebook(name)) + "\n"


def first_code_cell(name: str) -> str:
  return next(cell.source for cell in notebook(name).cells if cell.cell_type == "code")


# The install cell: the first code cell of every notebook, plain Python that stops with install
# instructions when jaxcl is missing (tests/test_notebooks.py checks that the notebooks agree on it).
INSTALL = first_code_cell(NOTEBOOKS[0]) + "\n"


def main() -> None:
  for name in NOTEBOOKS:
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(render(name))
    print("wrote", os.path.relpath(path))


if __name__ == "__main__":
  sys.exit(main())
