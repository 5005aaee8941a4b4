"""jaxcl.data.digits: the digits tfds builder (real data: scikit-learn's digits, written as ArrayRecord
into a temporary data_dir) and captions made from labels."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcl.data import digits, tfds_source


def test_builder_writes_array_record_and_reads_back_sklearn_digits(digits_dir, sk_digits):
  images, target = sk_digits
  files = sorted(p.name for p in (pathlib.Path(digits_dir) / "jaxcl_digits" / "1.0.0").iterdir())
  assert any(f.startswith("jaxcl_digits-train.array_record") for f in files), files
  assert any(f.startswith("jaxcl_digits-test.array_record") for f in files), files
  seen = {}
  for split in ("train", "test"):
    ds = tfds.data_source("jaxcl_digits", split=split, data_dir=digits_dir, download=False)
    idx = []
    for example in ds:
      i = int(example["index"])
      assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
      np.testing.assert_array_equal(example["image"][..., 0], np.round(images[i] * 255 / 16))
      assert int(example["label"]) == target[i]
      idx.append(i)
    seen[split] = np.array(idx)
  train, test = seen["train"], seen["test"]
  assert len(np.unique(train)) == len(train) and len(np.unique(test)) == len(test)
  assert not set(train) & set(test)
  assert sorted(np.r_[train, test].tolist()) == list(range(1797))
  for c in range(10):  # stratified: 20% of every class in "test"
    n_c = int(np.sum(target == c))
    assert np.sum(target[test] == c) == round(0.2 * n_c)


def test_builder_split_is_fixed(tmp_path, digits_dir):
  other = tfds_source.prepare_digits(tmp_path)
  for split in ("train", "test"):
    a = tfds.data_source("jaxcl_digits", split=split, data_dir=digits_dir, download=False)
    b = tfds.data_source("jaxcl_digits", split=split, data_dir=other, download=False)
    assert sorted(int(e["index"]) for e in a) == sorted(int(e["index"]) for e in b)


def test_stratified_split_errors():
  with pytest.raises(ValueError, match="test_fraction"):
    digits.stratified_split(np.zeros(4, int), test_fraction=1.0)
  with pytest.raises(ValueError, match="rank 1"):
    digits.stratified_split(np.zeros((2, 2), int))


def test_captions_deterministic_and_from_templates():
  labels = np.arange(50) % 10
  a = digits.captions_for_labels(labels, np.random.default_rng(7))
  b = digits.captions_for_labels(labels, np.random.default_rng(7))
  c = digits.captions_for_labels(labels, np.random.default_rng(8))
  assert a == b and a != c
  assert digits.captions_for_labels(labels, 7) == a  # an int seed is the same as default_rng(seed)
  used = set()
  for caption, y in zip(a, labels):
    matches = [t for t in digits.CAPTION_TEMPLATES if t.format(digits.CLASS_NAMES[y]) == caption]
    assert matches, caption
    used.add(matches[0])
  assert len(used) > 3  # the template is drawn per example
  assert len(digits.CAPTION_TEMPLATES) >= 8 and digits.CLASS_NAMES[0] == "zero"


def test_captions_bad_labels():
  with pytest.raises(ValueError, match=r"`labels` must be in \[0, 9\]"):
    digits.captions_for_labels([3, 10], 0)
  with pytest.raises(TypeError, match="integer dtype"):
    digits.captions_for_labels([1.0], 0)
  with pytest.raises(ValueError, match="rank 1"):
    digits.captions_for_labels([[1]], 0)
