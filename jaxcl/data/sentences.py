"""A sentence-pair corpus that ships with the installed packages: (summary, description) pairs of the
docstrings of public callables (`data_config.name = "docstrings"`).

Every documented function or class of `DOCSTRING_MODULES` (numpy, scipy, scikit-learn, optax, jax,
matplotlib: the dependencies of `jaxcl[train]`, so nothing is downloaded) gives one pair:

    summary      the docstring's first paragraph                ("Compute the median along the specified axis.")
    description  the first sentence of its second paragraph     ("Returns the median of the array elements.")

kept when the summary has 4-30 words and the description 6-40, both begin as prose (a letter or "`",
not a list item or field list), neither looks like a signature ("f(x, y)", "->") or a section header
("Parameters", "----", ".. note::") nor ends with a colon, the description is not a template shared by
several callables (its first four words begin `TEMPLATE_LIMIT` or more descriptions: "This function
lowers directly to ...", "Read more in the User Guide ..."), and neither side repeats a sentence already
taken (lower-cased). Modules, names and objects are visited in sorted order, so the corpus is a function
of the installed package versions only; its size is in `SourceInfo.num_examples` (898 pairs, 201 held
out, with numpy 2.4.6, scipy 1.17.1, scikit-learn 1.9.1, optax 0.2.8, jax 0.10.2, matplotlib 3.11.2).

The split is a hash of the text, stable when the package versions add or drop other pairs: a pair is in
"test" when the SHA-1 of "summary\\ndescription" is 0 mod `TEST_MODULUS` (about 1 in 5), else in
"train". The two splits are disjoint by construction.

The source (`DocstringPairs`) is a grain random-access source of

    summary      str
    description  str
    index        int32, the pair's position in its split (the stable example id)
    label        int32, -1 (no classes)

and no image (`SourceInfo.image_shape == ()`). A held-out evaluation that fits this data is retrieval
of each summary's own description among those of the split (`jaxcl.train.methods.sentence`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import inspect
import re
from typing import Any, Iterable, Sequence

import numpy as np

from jaxcl.data.source_info import SourceInfo

SOURCE_NAME = "docstrings"
SPLITS = ("train", "test")
# Public callables of the packages `pip install jaxcl[train]` brings (jax and numpy are core).
DOCSTRING_MODULES = (
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random",
    "scipy.linalg", "scipy.stats", "scipy.special", "scipy.optimize", "scipy.signal", "scipy.sparse",
    "scipy.spatial", "scipy.interpolate", "scipy.integrate", "scipy.ndimage",
    "sklearn.metrics", "sklearn.preprocessing", "sklearn.linear_model", "sklearn.cluster",
    "sklearn.decomposition", "sklearn.ensemble", "sklearn.model_selection", "sklearn.neighbors",
    "sklearn.svm", "sklearn.manifold", "sklearn.mixture", "sklearn.covariance",
    "optax", "jax", "jax.numpy", "jax.nn", "jax.lax", "jax.random", "matplotlib.pyplot",
)
SUMMARY_WORDS = (4, 30)
DESCRIPTION_WORDS = (6, 40)
TEMPLATE_LIMIT = 3  # descriptions whose first 4 words begin this many or more are boilerplate
TEST_MODULUS = 5

_SECTION = re.compile(
    r"^((other )?parameters|returns?|yields?|raises|examples?|notes?|see also|references|attributes|args|"
    r"(keyword )?arguments|methods|warnings?|deprecated)\s*:?$|^[-=~*]{3,}$|^\.\. ", re.IGNORECASE)
_SIGNATURE = re.compile(r"^[\w.]+\(|->")
_PROSE = re.compile(r"[A-Za-z`]")
_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)")


def paragraphs(doc: str) -> list[str]:
  """The paragraphs of a docstring (runs of non-blank lines), each as one line of stripped lines; None
  when a paragraph starts with a section header or a directive."""
  out, current = [], []
  for line in doc.splitlines() + [""]:
    if line.strip():
      current.append(line.strip())
    elif current:
      out.append(None if _SECTION.match(current[0]) or any(_SECTION.match(l) for l in current[1:2]) else
                 " ".join(current))
      current = []
  return out


def first_sentence(text: str) -> str:
  """`text` up to its first ".", "!" or "?" followed by a space or the end (all of it when none).

  >>> first_sentence("Returns the median, e.g. of x. Then more.")
  'Returns the median, e.g.'
  """
  match = _SENTENCE.match(text)
  return match.group(1) if match else text


def _words_between(text: str, bounds: tuple[int, int]) -> bool:
  return bounds[0] <= len(text.split()) <= bounds[1]


def docstring_pair(doc: str | None) -> tuple[str, str] | None:
  """(summary, description) of a docstring, or None when it fails a filter (module docstring).

  >>> docstring_pair("Compute the median along an axis.\\n\\nReturns the median of the array elements. More.")
  ('Compute the median along an axis.', 'Returns the median of the array elements.')
  >>> docstring_pair("median(a, axis=None)\\n\\nReturns the median of the array elements.") is None
  True
  """
  if not doc:
    return None
  parts = paragraphs(doc)
  if len(parts) < 2 or parts[0] is None or parts[1] is None:
    return None
  summary, description = parts[0], first_sentence(parts[1])
  if _SIGNATURE.search(summary) or _SIGNATURE.search(description) or description.endswith(":"):
    return None
  if not (_PROSE.match(summary) and _PROSE.match(description)):  # a list item, a field list
    return None
  if not (_words_between(summary, SUMMARY_WORDS) and _words_between(description, DESCRIPTION_WORDS)):
    return None
  return summary, description


def _public_callables(module_names: Iterable[str]):
  seen = set()
  for name in module_names:
    module = importlib.import_module(name)
    for attr in sorted(a for a in dir(module) if not a.startswith("_")):
      obj = getattr(module, attr, None)
      if callable(obj) and id(obj) not in seen:
        seen.add(id(obj))
        yield obj


def harvest_pairs(module_names: Sequence[str] = DOCSTRING_MODULES) -> tuple[tuple[str, str], ...]:
  """The corpus: `docstring_pair` of every public callable of `module_names` (in that order, names
  sorted, each object once), without templated descriptions and repeated sentences (module docstring)."""
  candidates = [p for p in (docstring_pair(inspect.getdoc(obj)) for obj in _public_callables(module_names)) if p]
  opening = lambda text: " ".join(text.lower().split()[:4])  # noqa: E731
  templates = collections.Counter(opening(d) for _, d in candidates)
  pairs, seen = [], set()
  for summary, description in candidates:
    if templates[opening(description)] >= TEMPLATE_LIMIT:
      continue
    if summary.lower() in seen or description.lower() in seen:
      continue
    seen.update((summary.lower(), description.lower()))
    pairs.append((summary, description))
  return tuple(pairs)


def split_of(pair: tuple[str, str]) -> str:
  """"test" when SHA-1("summary\\ndescription") ≡ 0 (mod `TEST_MODULUS`), else "train".

  >>> split_of(("Compute the median along an axis.", "Returns the median of the array elements."))
  'train'
  """
  digest = hashlib.sha1("\n".join(pair).encode("utf-8")).hexdigest()
  return "test" if int(digest, 16) % TEST_MODULUS == 0 else "train"


@functools.lru_cache(maxsize=4)
def split_pairs(split: str, module_names: tuple[str, ...] = DOCSTRING_MODULES) -> tuple[tuple[str, str], ...]:
  """The pairs of `split` ("train" | "test"), in corpus order (harvested once per process)."""
  if split not in SPLITS:
    raise ValueError(f"`split` of the {SOURCE_NAME!r} data must be one of {SPLITS}, got {split!r}.")
  return tuple(p for p in _harvest_cached(tuple(module_names)) if split_of(p) == split)


@functools.lru_cache(maxsize=2)
def _harvest_cached(module_names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
  return harvest_pairs(module_names)


class DocstringPairs:
  """A grain random-access source of the (summary, description) pairs of one split."""

  def __init__(self, split: str, pairs: Sequence[tuple[str, str]]):
    self.split = split
    self.pairs = tuple(pairs)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> dict[str, Any]:
    summary, description = self.pairs[i]
    return {"summary": summary, "description": description, "index": np.int32(i), "label": np.int32(-1)}

  def __repr__(self) -> str:
    return f"DocstringPairs(split={self.split!r}, pairs={len(self.pairs)})"


def build(data_config: Any, split: str) -> tuple[DocstringPairs, SourceInfo]:
  """(source, info) of the docstring pairs of `split` ("train" | "test"); `data_config` has nothing to set."""
  pairs = split_pairs(split)
  info = SourceInfo(num_examples=len(pairs), image_shape=(), num_classes=0, class_names=(), has_captions=False,
                    captions_from_labels=False, caption_templates=(), num_ids=len(pairs))
  return DocstringPairs(split, pairs), info
