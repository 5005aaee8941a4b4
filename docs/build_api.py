"""Writes docs/api.md, the API reference, from the signatures and docstrings of every public name.

    python docs/build_api.py           # rewrite docs/api.md
    python docs/build_api.py --check   # exit status 1 (and say so) when docs/api.md is out of date

Public names: `__all__` of jaxcl.losses, jaxcl.ops, jaxcl.grad_cache, jaxcl.eval, jaxcl.models and jaxcl.data, and the
entry points of the training system listed in `TRAIN` below. Docstrings are reproduced verbatim (in
text blocks, so formulas and doctest examples keep their layout). `tests/test_docs.py` checks that the
committed file is what this script writes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import re
import sys
import types
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUTPUT = os.path.join(HERE, "api.md")

# (package, title). Each package's `__all__` is documented in its order.
PACKAGES = (
    ("jaxcl.losses", "Losses"),
    ("jaxcl.ops", "Similarity engines"),
    ("jaxcl.grad_cache", "Gradient caching"),
    ("jaxcl.eval", "Evaluation"),
    ("jaxcl.models", "Models"),
    ("jaxcl.data", "Data"),
)
# The training system has no `__all__`; these are its entry points.
TRAIN = (
    ("jaxcl.train.loop", "train_and_evaluate"),
    ("jaxcl.train.state", "TrainState"),
    ("jaxcl.train.config", "base_config"),
    ("jaxcl.train.optim", "make_optimizer"),
    ("jaxcl.train.optim", "learning_rate_schedule"),
    ("jaxcl.train.metrics", "MetricsWriter"),
    ("jaxcl.train.metrics", "read_metrics"),
    ("jaxcl.train.metrics", "write_plots"),
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WIDTH = 100


class _Raw:
  """An annotation shown as written (string annotations would otherwise be quoted)."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


def _clean(annotation):
  if annotation is inspect.Parameter.empty:
    return annotation
  if isinstance(annotation, typing.ForwardRef):  # string annotations of NamedTuple fields
    annotation = annotation.__forward_arg__
  return _Raw(annotation if isinstance(annotation, str) else inspect.formatannotation(annotation))


def _default(value):
  """Classes and functions as defaults by their import path (`jax.numpy.float32`, not `<class ...>`)."""
  if value is inspect.Parameter.empty:
    return value
  if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
    module = getattr(value, "__module__", None)
    return _Raw(f"{module}.{value.__qualname__}" if module else value.__qualname__)
  return value


def signature(name: str, obj) -> str | None:
  """`name(params) -> ret` with unquoted annotations, one parameter per line when long."""
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return None
  params = [p.replace(annotation=_clean(p.annotation), default=_default(p.default))
            for p in sig.parameters.values()
            if not (inspect.isclass(obj) and p.name in ("parent", "name"))]  # flax Module internals
  sig = sig.replace(parameters=params, return_annotation=_clean(sig.return_annotation))
  text = _ADDRESS.sub("", f"{name}{sig}")
  if len(text) <= _WIDTH:
    return text
  body = str(sig)
  ret = ""
  if sig.return_annotation is not inspect.Signature.empty:
    body, ret = body.rsplit(" -> ", 1)
    ret = f" -> {ret}"
  parts = [_ADDRESS.sub("", str(p)) for p in params]
  # A bare "*" or "/" marker comes back from str(sig) only; rebuild them from the parameter kinds.
  shown, seen_kw, last_pos_only = [], False, False
  for p, text_p in zip(params, parts):
    if p.kind is inspect.Parameter.POSITIONAL_ONLY:
      last_pos_only = True
    elif last_pos_only:
      shown.append("/")
      last_pos_only = False
    if p.kind is inspect.Parameter.KEYWORD_ONLY and not seen_kw:
      shown.append("*")
      seen_kw = True
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
      seen_kw = True
    shown.append(text_p)
  if last_pos_only:
    shown.append("/")
  return f"{name}(\n" + "".join(f"    {s},\n" for s in shown) + f"){ret}"


def _doc(obj) -> str:
  doc = obj.__doc__ if isinstance(obj, types.ModuleType) else inspect.getdoc(obj)
  if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
    return ""  # the signature a dataclass writes as its docstring: shown above already
  return inspect.cleandoc(doc) if doc else ""


def _text_block(text: str) -> str:
  return "```text\n" + text.rstrip() + "\n```\n"


def entry(qualname: str, obj, level: str = "###") -> str:
  """The markdown of one public name."""
  out = [f"{level} `{qualname}`\n"]
  short = qualname.rsplit(".", 1)[-1]
  if isinstance(obj, functools.partial):
    target = obj.func
    args = ", ".join([f"{target.__module__}.{target.__qualname__}"] + [repr(a) for a in obj.args]
                     + [f"{k}={v!r}" for k, v in obj.keywords.items()])
    out.append(f"```python\n{short} = functools.partial({args})\n```\n")
    out.append(f"`{target.__qualname__}` with these settings; see `{target.__module__}.{target.__qualname__}`.\n")
    return "\n".join(out)
  if isinstance(obj, types.ModuleType):
    out.append(_text_block(_doc(obj)) if _doc(obj) else "(no module docstring)\n")
    names = getattr(obj, "__all__", None) or sorted(
        n for n, v in vars(obj).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == obj.__name__)
    for n in names:
      out.append(entry(f"{qualname}.{n}", getattr(obj, n), level + "#"))
    return "\n".join(out)
  if not callable(obj):
    out.append(f"```python\n{short} = {_ADDRESS.sub('', repr(obj))}\n```\n")
    return "\n".join(out)
  sig = signature(short, obj)
  if sig:
    prefix = "class " if inspect.isclass(obj) else ""
    out.append(f"```python\n{prefix}{sig}\n```\n")
  doc = _doc(obj)
  if doc:
    out.append(_text_block(doc))
  else:
    module = None if inspect.isclass(obj) else sys.modules.get(getattr(obj, "__module__", ""))
    module_doc = _doc(module) if module else ""
    out.append(f"(no docstring; the docstring of its module `{module.__name__}`:)\n\n" + _text_block(module_doc)
               if module_doc else "(no docstring)\n")
  return "\n".join(out)


def render() -> str:
  """The text of docs/api.md."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  toc, body = [], []
  for package, title in PACKAGES:
    module = importlib.import_module(package)
    anchor = package.replace(".", "")
    toc.append(f"- [{title}: `{package}`](#{anchor}) — " + ", ".join(f"`{n}`" for n in module.__all__))
    body.append(f"## {package}\n")
    body.append(_text_block(_doc(module)))
    for name in module.__all__:
      body.append(entry(f"{package}.{name}", getattr(module, name)))
  toc.append("- [Training: `jaxcl.train`](#jaxcltrain) — " + ", ".join(f"`{n}`" for _, n in TRAIN))
  body.append("## jaxcl.train\n")
  body.append(_text_block(_doc(importlib.import_module("jaxcl.train.loop"))))
  for module_name, name in TRAIN:
    body.append(entry(f"{module_name}.{name}", getattr(importlib.import_module(module_name), name)))
  toc.append("- [Command line: `jaxcl.main`](#jaxclmain)")
  body.append("## jaxcl.main\n")
  with open(os.path.join(ROOT, "jaxcl", "main.py"), encoding="utf-8") as f:  # not imported: it defines flags
    body.append(_text_block(inspect.cleandoc(ast.get_docstring(ast.parse(f.read())))))
  head = (
      "# jaxcl API reference\n\n"
      "Generated from the docstrings by `python docs/build_api.py`; do not edit by hand. Every example\n"
      "(`>>>`) below is executed by the test suite (pytest runs the doctests of `jaxcl/`).\n\n"
  )
  return head + "\n".join(toc) + "\n\n" + "\n".join(body)


def main(argv: list[str]) -> int:
  text = render()
  if "--check" in argv:
    with open(OUTPUT, encoding="utf-8") as f:
      if f.read() != text:
        print("docs/api.md is out of date: run `python docs/build_api.py`.")
        return 1
    return 0
  with open(OUTPUT, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {os.path.relpath(OUTPUT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
