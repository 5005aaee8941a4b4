"""The docstring sentence-pair corpus (jaxcl/data/sentences.py): the filters on hand-written docstrings,
the harvest of a hand-made module (templates and repeats dropped, deterministic), and the real corpus's
split (disjoint, by hash, about 1 in 5 held out) and source."""

import hashlib
import sys
import types

import numpy as np
import pytest

from jaxcl.data import sentences, sources

SUMMARY = "Compute the median of the array elements."
DESCRIPTION = "The median is the middle value of a sorted copy of the array."


@pytest.mark.parametrize("doc, want", [
    (f"{SUMMARY}\n\n{DESCRIPTION} A second sentence.\n\nParameters\n----------\n", (SUMMARY, DESCRIPTION)),
    # the summary's paragraph joined over its lines; the description cut at its first sentence
    ("Compute the median\n  of the array elements.\n\nThe median is the middle value of it! Then more.",
     ("Compute the median of the array elements.", "The median is the middle value of it!")),
    (None, None),
    (SUMMARY, None),  # one paragraph
    (f"median(a, axis=None)\n\n{DESCRIPTION}", None),  # a signature
    (f"{SUMMARY}\n\nParameters\n----------\na : array", None),  # a section, not a description
    (f"{SUMMARY}\n\nArgs:\n  x: the input.", None),
    (f"{SUMMARY}\n\n.. note:: {DESCRIPTION}", None),
    (f"{SUMMARY}\n\nThe constraint has the general inequality form::", None),  # ends with a colon
    (f"{SUMMARY}\n\nReturns x -> y as an array of things.", None),  # an arrow
    (f"Compute the median.\n\n{DESCRIPTION}", None),  # 3 words: too short a summary
    (f"{SUMMARY}\n\nThe median of it.", None),  # 4 words: too short a description
    (f"{SUMMARY}\n\n" + " ".join(["word"] * 41) + ".", None),  # 41 words: too long
])
def test_docstring_pair_filters(doc, want):
  assert sentences.docstring_pair(doc) == want


def _documented(name, summary, description):
  def f():
    pass
  f.__doc__ = f"{summary}\n\n{description}"
  f.__name__ = name
  return f


@pytest.fixture
def fake_module():
  """A module of documented functions: three descriptions from one template, two from another, a
  repeated summary, an undocumented and a private function."""
  module = types.ModuleType("jaxcl_fake_docs")
  entries = {
      "a_one": ("Add one to every element of x.", "This function lowers directly to the add operation."),
      "a_two": ("Subtract one from every element of x.", "This function lowers directly to the sub operation."),
      "a_three": ("Multiply every element of x by two.", "This function lowers directly to the mul operation."),
      "b_one": ("Divide every element of x by two.", "Read the user guide for the division rules."),
      "b_two": ("Negate every element of the array x.", "Read the user guide for the negation rules."),
      "c_repeat": ("Divide every element of x by two.", "Halves each entry of the given array exactly."),
  }
  for name, (summary, description) in entries.items():
    setattr(module, name, _documented(name, summary, description))
  module.d_undocumented = lambda: None
  module._private = _documented("_private", "A private function we never read.", "It stays out of the corpus always.")
  sys.modules[module.__name__] = module
  yield module.__name__
  del sys.modules[module.__name__]


def test_harvest_drops_templates_and_repeats(fake_module):
  pairs = sentences.harvest_pairs((fake_module,))
  # names in sorted order; "This function lowers directly" begins 3 descriptions (a template), "Read
  # the user guide" 2 (kept); c_repeat repeats b_one's summary; the private and undocumented are skipped
  assert pairs == (("Divide every element of x by two.", "Read the user guide for the division rules."),
                   ("Negate every element of the array x.", "Read the user guide for the negation rules."))
  assert sentences.harvest_pairs((fake_module,)) == pairs  # deterministic


def test_split_is_a_hash_of_the_text():
  pair = (SUMMARY, DESCRIPTION)
  digest = int(hashlib.sha1(f"{SUMMARY}\n{DESCRIPTION}".encode()).hexdigest(), 16)
  assert sentences.split_of(pair) == ("test" if digest % 5 == 0 else "train")
  # a pair's split is its own: the same with or without other pairs in the corpus
  held_out = [(f"summary {i} of some function", DESCRIPTION) for i in range(40)]
  assert sum(sentences.split_of(p) == "test" for p in held_out) == sum(
      int(hashlib.sha1(f"{s}\n{d}".encode()).hexdigest(), 16) % 5 == 0 for s, d in held_out)


def test_the_corpus_splits_and_source():
  """The real corpus (the installed packages' docstrings): disjoint splits covering it, about 1 in 5
  held out, and a source of the pairs with stable ids and no image."""
  corpus = sentences.harvest_pairs()
  train, test = sentences.split_pairs("train"), sentences.split_pairs("test")
  assert len(corpus) > 500, len(corpus)  # 898 with numpy 2.4, scipy 1.17, scikit-learn 1.9, jax 0.10
  assert set(train).isdisjoint(test) and sorted(train + test) == sorted(corpus)
  assert 0.12 < len(test) / len(corpus) < 0.28
  assert all(sentences.split_of(p) == "test" for p in test)
  summaries = [s.lower() for s, _ in corpus]
  descriptions = [d.lower() for _, d in corpus]
  assert len(set(summaries + descriptions)) == 2 * len(corpus)  # no sentence twice
  assert all(sentences.docstring_pair(f"{s}\n\n{d}") == (s, d) for s, d in corpus)  # each passes the filters
  source, info = sources.build_source({"name": "docstrings"}, "test")
  assert len(source) == info.num_examples == info.num_ids == len(test)
  assert info.image_shape == () and info.num_classes == 0 and repr(source) == f"DocstringPairs(split='test', pairs={len(test)})"
  example = source[3]
  assert (example["summary"], example["description"]) == test[3]
  assert example["index"] == np.int32(3) and example["label"] == -1
  with pytest.raises(ValueError, match="`split` of the 'docstrings' data must be one of"):
    sentences.split_pairs("validation")
