"""jaxcl.data.sources: the backend picked from the config, a split read whole (`load_arrays`) and a batch
at a time (`split_batches`)."""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from jaxcl.data import sources
from tests.data.reference import bilinear_reference
from tests.helpers import digits_config


def test_split_batches_of_processes_cover_the_split_once_in_order(digits_dir):
  cfg = digits_config(digits_dir)
  whole = sources.load_arrays(cfg, "test")  # 359 examples: batches of 96 over 3 processes, 32 rows each
  parts = [sources.split_batches(cfg, "test", 96, process_index=p, process_count=3) for p in range(3)]
  assert {n for n, _ in parts} == {359}
  per_process = [list(batches) for _, batches in parts]
  assert [len(b) for b in per_process] == [4, 4, 4]
  # the global batch g: the processes' parts one after the other
  glued = {k: np.concatenate([per_process[p][g][k] for g in range(4) for p in range(3)]) for k in per_process[0][0]}
  assert glued["image"].shape == (384, 8, 8, 1) and glued["image"].dtype == np.float32
  assert glued["valid"].tolist() == [True] * 359 + [False] * 25
  np.testing.assert_array_equal(glued["image"][:359], whole["image"])
  np.testing.assert_array_equal(glued["label"][:359], whole["label"])
  assert not glued["image"][359:].any() and glued["row"].tolist() == list(range(359)) + [358] * 25
  np.testing.assert_array_equal(glued["index"][:359], whole["index"])  # the example ids
  assert not glued["index"][359:].any() and not glued["label"][359:].any()
  with pytest.raises(ValueError, match=r"`batch_size` must be a positive multiple of process_count=3, got 100"):
    sources.split_batches(cfg, "test", 100, process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r"`process_index` must lie in \[0, process_count\)"):
    sources.split_batches(cfg, "test", 96, process_index=3, process_count=3)


def test_digits_resize_and_load_arrays(digits_dir):
  source, info = sources.build_source(digits_config(digits_dir, image_size=16), "test")
  assert info.image_shape == (16, 16, 1)
  small = sources.build_source(digits_config(digits_dir), "test")[0][5]["image"]
  big = source[5]["image"]
  assert big.shape == (16, 16, 1) and 0 <= big.min() and big.max() <= 1
  # Upsampling is plain bilinear interpolation between pixel centres.
  np.testing.assert_allclose(big, bilinear_reference(small, (0, 0, 8, 8), (16, 16)), atol=1e-5)
  arrays = sources.load_arrays(digits_config(digits_dir), "test")
  assert arrays["image"].shape == (359, 8, 8, 1) and arrays["image"].dtype == np.float32
  assert arrays["label"].dtype == np.int32 and arrays["index"].dtype == np.int32
  assert len(arrays["caption"]) == 359
  assert sources.read_captions(digits_config(digits_dir), "test") == ()  # made from labels: none of its own
  np.testing.assert_array_equal(arrays["image"][5], small)
  assert sorted(np.bincount(arrays["label"])) == sorted(
      round(0.2 * n) for n in np.bincount(sk_datasets.load_digits().target)
  )


def test_bad_data_config():
  with pytest.raises(ValueError, match="data_config.name"):
    sources.build_source({"name": "imagenet"}, "train")
  with pytest.raises(ValueError, match="data_config.name"):
    sources.read_captions({"name": "imagenet"}, "train")
  with pytest.raises(ValueError, match="image_size"):
    sources.build_source({"name": "digits", "image_size": -1}, "train")
  with pytest.raises(ValueError, match="tfds_name"):
    sources.build_source({"name": "tfds", "tfds_name": ""}, "train")
