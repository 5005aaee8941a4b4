"""The data layer: digits builder, sources (digits / tfds / folder), grain loaders, augmentations.

Real data: scikit-learn's digits, written as ArrayRecord into a temporary data_dir. References are
independent NumPy (float64 bilinear sampling, gaussian blur, the sklearn arrays themselves).
"""

import csv
import io
import pathlib
import pickle
import re

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn import datasets as sk_datasets

from jaxcl.data import augment, digits, pipeline, sources

# --------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return sources.prepare_digits(tmp_path_factory.mktemp("tfds"))


def digits_config(data_dir, **overrides):
  cfg = sources.default_data_config("digits")
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def sk_digits():
  bunch = sk_datasets.load_digits()
  return bunch.images, bunch.target


# --------------------------------------------------------------------------------------------------
# The digits builder.


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
  other = sources.prepare_digits(tmp_path)
  for split in ("train", "test"):
    a = tfds.data_source("jaxcl_digits", split=split, data_dir=digits_dir, download=False)
    b = tfds.data_source("jaxcl_digits", split=split, data_dir=other, download=False)
    assert sorted(int(e["index"]) for e in a) == sorted(int(e["index"]) for e in b)


def test_stratified_split_errors():
  with pytest.raises(ValueError, match="test_fraction"):
    digits.stratified_split(np.zeros(4, int), test_fraction=1.0)
  with pytest.raises(ValueError, match="rank 1"):
    digits.stratified_split(np.zeros((2, 2), int))


# --------------------------------------------------------------------------------------------------
# Captions.


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


# --------------------------------------------------------------------------------------------------
# Sources.


def test_digits_source(digits_dir, sk_digits):
  images, target = sk_digits
  source, info = sources.build_source(digits_config(digits_dir), "train")
  assert info.num_examples == len(source) == 1438
  assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
  assert info.class_names == digits.CLASS_NAMES and info.has_captions
  for i in (0, 7, 1437):
    ex = source[i]
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (8, 8, 1)
    assert ex["label"].dtype == np.int32 and ex["index"].dtype == np.int32
    j = int(ex["index"])
    np.testing.assert_allclose(ex["image"][..., 0], images[j] / 16, atol=0.5 / 255 + 1e-7)
    assert ex["label"] == target[j]
    assert digits.CLASS_NAMES[target[j]] in ex["caption"]
  clone = pickle.loads(pickle.dumps(source))  # grain workers receive a pickled source
  np.testing.assert_array_equal(clone[3]["image"], source[3]["image"])
  assert repr(clone) == repr(source) and "0x" not in repr(source)
  with pytest.raises(IndexError):
    source[len(source)]


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
  np.testing.assert_allclose(big, _bilinear_reference(small, (0, 0, 8, 8), (16, 16)), atol=1e-5)
  arrays = sources.load_arrays(digits_config(digits_dir), "test")
  assert arrays["image"].shape == (359, 8, 8, 1) and arrays["image"].dtype == np.float32
  assert arrays["label"].dtype == np.int32 and arrays["index"].dtype == np.int32
  assert len(arrays["caption"]) == 359
  np.testing.assert_array_equal(arrays["image"][5], small)
  assert sorted(np.bincount(arrays["label"])) == sorted(
      round(0.2 * n) for n in np.bincount(sk_datasets.load_digits().target)
  )


def test_resize_square():
  x = np.random.default_rng(0).random((6, 4, 2)).astype(np.float32)
  y = sources.resize_square(x, 4)
  assert y.shape == (4, 4, 2)
  np.testing.assert_allclose(y, x[1:5], atol=1e-6)  # shorter side already 4: the central square
  assert sources.resize_square(x, 0) is x
  constant = np.full((5, 7, 1), 0.3, np.float32)
  np.testing.assert_allclose(sources.resize_square(constant, 3), 0.3, atol=1e-6)


def test_bad_data_config():
  with pytest.raises(ValueError, match="data_config.name"):
    sources.build_source({"name": "imagenet"}, "train")
  with pytest.raises(ValueError, match="image_size"):
    sources.build_source({"name": "digits", "image_size": -1}, "train")
  with pytest.raises(ValueError, match="tfds_name"):
    sources.build_source({"name": "tfds", "tfds_name": ""}, "train")


class JaxclTestPngImages(tfds.core.GeneratorBasedBuilder):
  """A tiny tfds dataset with PNG-encoded Image features, ClassLabel and Text (no TensorFlow)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "dog", "owl"]),
            "caption": tfds.features.Text(),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        "train": self._generate_examples(range(6)),
        "test": self._generate_examples(range(6, 9)),
    }

  def _generate_examples(self, ids):
    for i in ids:
      image = _png_bytes(_pattern(i, 5, 6, 3))
      yield i, {"image": image, "label": i % 3, "caption": f"picture {i}", "id": i}


def _pattern(i, h, w, c):
  rng = np.random.default_rng(100 + i)
  return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def _png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buf, format="PNG")
  return buf.getvalue()


def test_tfds_source_with_png_images(tmp_path):
  builder = JaxclTestPngImages(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  cfg = sources.default_data_config("tfds")
  cfg.update(dict(tfds_name="jaxcl_test_png_images", data_dir=str(tmp_path), image_size=5))
  source, info = sources.build_source(cfg, "train")
  assert len(source) == 6 and info.num_classes == 3
  assert info.class_names == ("cat", "dog", "owl")
  raw = tfds.data_source(
      "jaxcl_test_png_images", split="train", data_dir=str(tmp_path), download=False
  )
  for k in range(6):
    i = int(raw[k]["id"])  # tfds shuffles the records; the id tells which pattern it is
    ex = source[k]
    # 5x6 images at image_size 5: no scaling, the central 5x5 square (columns 0..4).
    np.testing.assert_array_equal(ex["image"], _pattern(i, 5, 6, 3)[:, :5] / np.float32(255))
    assert ex["label"] == i % 3 and ex["index"] == k and "caption" not in ex
  # Captions from a Text feature, and resizing the variable-size Image feature.
  cfg.update(dict(caption_key="caption", image_size=4))
  source, info = sources.build_source(cfg, "test")
  assert info.image_shape == (4, 4, 3) and info.has_captions
  assert sorted(source[k]["caption"] for k in range(3)) == ["picture 6", "picture 7", "picture 8"]
  cfg.update(dict(image_size=0, caption_key=""))
  with pytest.raises(ValueError, match="variable size"):
    sources.build_source(cfg, "train")
  cfg.update(dict(image_size=4, image_key="pixels"))
  with pytest.raises(ValueError, match="image_key"):
    sources.build_source(cfg, "train")
  cfg.update(dict(image_key="image", tfds_name="jaxcl_no_such_dataset"))
  with pytest.raises(ValueError, match="jaxcl_no_such_dataset.*prepared on disk"):
    sources.build_source(cfg, "train")


# --------------------------------------------------------------------------------------------------
# Folder sources.


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def _folder_config(folder, **overrides):
  cfg = sources.default_data_config("folder")
  cfg.folder = str(folder)
  cfg.update(overrides)
  return cfg


def test_folder_with_classes_and_tsv_captions(tmp_path):
  names = {"bird": 2, "ant": 3}  # classes are sorted: ant = 0, bird = 1
  arrays = {}
  for cls, n in names.items():
    for k in range(n):
      arrays[f"{cls}/img{k}.png"] = _pattern(len(arrays), 6, 5, 3)
      _save(tmp_path / "data" / cls / f"img{k}.png", arrays[f"{cls}/img{k}.png"])
  (tmp_path / "data" / "notes.txt").write_text("not an image, ignored")
  (tmp_path / "data" / "ant" / "readme.md").write_text("ignored")
  captions = tmp_path / "captions.tsv"
  rows = "".join(f"{k}\ta {k}, with a comma\n" for k in arrays)
  captions.write_text("filename\tcaption\n" + rows)
  cfg = _folder_config(tmp_path / "data", captions_file=str(captions))
  source, info = sources.build_source(cfg, "train")
  assert info == sources.SourceInfo(
      num_examples=5, image_shape=(6, 5, 3), num_classes=2, class_names=("ant", "bird"), has_captions=True,
      captions_from_labels=False, caption_templates=sources.GENERIC_CAPTION_TEMPLATES, num_ids=5)
  order = sorted(arrays)  # ant/img0, ant/img1, ant/img2, bird/img0, bird/img1
  for i, key in enumerate(order):
    ex = source[i]
    np.testing.assert_array_equal(ex["image"], arrays[key] / np.float32(255))
    assert ex["label"] == (0 if key.startswith("ant") else 1) and ex["index"] == i
    assert ex["caption"] == f"a {key}, with a comma"
  loaded = sources.load_arrays(cfg, "test")  # no split subfolders: the folder serves every split
  assert loaded["image"].shape == (5, 6, 5, 3)
  assert loaded["caption"][0] == "a ant/img0.png, with a comma"


def test_folder_flat_grayscale_csv_captions_and_splits(tmp_path):
  for k in range(3):
    _save(tmp_path / "flat" / f"{k}.png", _pattern(k, 4, 4, 1))
  with open(tmp_path / "caps.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerows([("0.png", "zero, quoted"), ("1.png", "one"), ("2.png", "two"), ("x.png", "unused")])
  cfg = _folder_config(tmp_path / "flat", captions_file=str(tmp_path / "caps.csv"))
  source, info = sources.build_source(cfg, "any")
  assert info.num_classes == 0 and info.image_shape == (4, 4, 1)
  assert [source[i]["label"] for i in range(3)] == [-1, -1, -1]
  assert source[0]["caption"] == "zero, quoted"
  np.testing.assert_array_equal(source[2]["image"], _pattern(2, 4, 4, 1) / np.float32(255))
  # Split subfolders.
  _save(tmp_path / "split" / "train" / "a" / "0.png", _pattern(0, 4, 4, 3))
  _save(tmp_path / "split" / "test" / "a" / "0.png", _pattern(1, 4, 4, 3))
  _save(tmp_path / "split" / "test" / "b" / "0.png", _pattern(2, 4, 4, 3))
  assert len(sources.build_source(_folder_config(tmp_path / "split"), "train")[0]) == 1
  test_source, test_info = sources.build_source(_folder_config(tmp_path / "split"), "test")
  assert len(test_source) == 2 and test_info.class_names == ("a", "b")
  with pytest.raises(ValueError, match="split subfolders.*'validation'"):
    sources.build_source(_folder_config(tmp_path / "split"), "validation")


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*contains no images"):
    sources.build_source(_folder_config(empty), "train")
  with pytest.raises(ValueError, match="is not a directory"):
    sources.build_source(_folder_config(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match="data_config.folder"):
    sources.build_source(_folder_config(""), "train")

  bad = tmp_path / "bad"
  _save(bad / "good.png", _pattern(0, 4, 4, 3))
  (bad / "broken.png").write_bytes(b"this is not a png")
  with pytest.raises(ValueError, match=f"Unreadable image.*{re.escape(str(bad / 'broken.png'))}"):
    sources.build_source(_folder_config(bad), "train")
  truncated = tmp_path / "truncated"
  _save(truncated / "a.png", _pattern(0, 16, 16, 3))
  data = (truncated / "a.png").read_bytes()
  (truncated / "a.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="Unreadable image.*a.png"):
    sources.build_source(_folder_config(truncated), "train")

  ok = tmp_path / "ok"
  for k in range(3):
    _save(ok / f"{k}.png", _pattern(k, 4, 4, 3))
  caps = tmp_path / "partial.tsv"
  caps.write_text("0.png\tzero\n2.png\ttwo\n")
  with pytest.raises(ValueError, match=f"{re.escape(str(caps))}.*no caption for 1 of 3.*1.png"):
    sources.build_source(_folder_config(ok, captions_file=str(caps)), "train")
  caps.write_text("0.png\tzero\n1.png\n2.png\ttwo\n")
  with pytest.raises(ValueError, match="line 2"):
    sources.build_source(_folder_config(ok, captions_file=str(caps)), "train")
  caps.write_text("0.png\tzero\n0.png\tagain\n")
  with pytest.raises(ValueError, match="appears twice"):
    sources.build_source(_folder_config(ok, captions_file=str(caps)), "train")
  with pytest.raises(ValueError, match="does not exist"):
    sources.build_source(_folder_config(ok, captions_file=str(tmp_path / "none.tsv")), "train")

  sizes = tmp_path / "sizes"
  _save(sizes / "a.png", _pattern(0, 4, 4, 3))
  _save(sizes / "b.png", _pattern(1, 5, 4, 3))
  with pytest.raises(ValueError, match="different sizes.*image_size"):
    sources.build_source(_folder_config(sizes), "train")
  source, info = sources.build_source(_folder_config(sizes, image_size=3), "train")
  assert info.image_shape == (3, 3, 3) and source[1]["image"].shape == (3, 3, 3)

  mixed = tmp_path / "mixed"
  _save(mixed / "cls" / "a.png", _pattern(0, 4, 4, 3))
  _save(mixed / "loose.png", _pattern(1, 4, 4, 3))
  with pytest.raises(ValueError, match="mixes class subfolders"):
    sources.build_source(_folder_config(mixed), "train")
  empty_class = tmp_path / "empty_class"
  _save(empty_class / "cls" / "a.png", _pattern(0, 4, 4, 3))
  (empty_class / "nothing").mkdir()
  with pytest.raises(ValueError, match=f"{re.escape(str(empty_class / 'nothing'))}.*no images"):
    sources.build_source(_folder_config(empty_class), "train")


# --------------------------------------------------------------------------------------------------
# Loaders.


def _indices(loader, n):
  it = iter(loader)
  return np.stack([next(it)["index"] for _ in range(n)])


def test_loader_order_is_seeded(digits_dir):
  cfg = digits_config(digits_dir)
  make = lambda seed, **kw: pipeline.make_train_loader(  # noqa: E731
      cfg, split="train", global_batch_size=32, seed=seed, **kw
  )
  first = _indices(make(0), 3)
  np.testing.assert_array_equal(first, _indices(make(0), 3))
  assert not np.array_equal(first, _indices(make(1), 3))
  batch = next(iter(make(0)))
  assert set(batch) == {"image", "label", "index", "caption"}
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["caption"].shape == (32,)
  for caption, y in zip(batch["caption"], batch["label"]):
    assert digits.CLASS_NAMES[y] in caption
  # shuffle=False reads the source in order.
  source, _ = sources.build_source(cfg, "train")
  in_order = next(iter(make(0, shuffle=False)))["index"]
  np.testing.assert_array_equal(in_order, [source[i]["index"] for i in range(32)])


def test_loader_one_epoch_and_sharding(digits_dir):
  cfg = digits_config(digits_dir)
  n = 1438
  shards = []
  for index in range(2):
    loader = pipeline.make_train_loader(
        cfg, split="train", global_batch_size=64, seed=5, num_epochs=1,
        shard_options=grain.sharding.ShardOptions(index, 2, drop_remainder=True),
    )
    batches = list(loader)
    assert all(b["image"].shape[0] == 32 for b in batches)  # per-process batch = 64 / 2
    assert len(batches) == (n // 2) // 32  # one epoch of the shard, remainder dropped
    idx = np.concatenate([b["index"] for b in batches])
    assert len(np.unique(idx)) == len(idx)
    shards.append(set(idx.tolist()))
  assert not shards[0] & shards[1]  # each process reads its own examples
  assert pipeline.per_process_batch_size(64, 4) == 16
  with pytest.raises(ValueError, match="divisible by the number of processes \\(3\\)"):
    pipeline.make_train_loader(
        cfg, split="train", global_batch_size=64, seed=0,
        shard_options=grain.sharding.ShardOptions(0, 3, drop_remainder=True),
    )
  with pytest.raises(ValueError, match="global_batch_size"):
    pipeline.make_train_loader(cfg, split="test", global_batch_size=360, seed=0)
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_train_loader(cfg, split="train", global_batch_size=8, seed=-1)
  with pytest.raises(ValueError, match="num_epochs"):
    pipeline.make_train_loader(cfg, split="train", global_batch_size=8, seed=0, num_epochs=0)


def test_iterator_state_resumes_exactly(digits_dir, tmp_path):
  cfg = digits_config(digits_dir)
  loader = pipeline.make_train_loader(cfg, split="train", global_batch_size=16, seed=11)
  it = iter(loader)
  for _ in range(95):  # crosses the first epoch boundary (89 batches per epoch)
    next(it)
  state = pipeline.save_iterator_state(it)
  want = [next(it) for _ in range(3)]
  resumed = pipeline.restore_iterator_state(
      iter(pipeline.make_train_loader(cfg, split="train", global_batch_size=16, seed=11)), state
  )
  for w in want:
    g = next(resumed)
    for key in ("image", "label", "index", "caption"):
      np.testing.assert_array_equal(g[key], w[key])
  # The same through an orbax checkpoint, next to a pytree.
  it = iter(loader)
  for _ in range(4):
    next(it)
  params = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=pipeline.iterator_checkpoint_args(it)))
    mngr.wait_until_finished()
  want = next(it)
  fresh = iter(loader)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(4, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        data=pipeline.iterator_checkpoint_args(fresh, restore=True)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  np.testing.assert_array_equal(next(fresh)["index"], want["index"])
  with pytest.raises(TypeError, match="bytes"):
    pipeline.restore_iterator_state(iter(loader), {"not": "bytes"})


# --------------------------------------------------------------------------------------------------
# Augmentations.


def _config(**overrides):
  """Everything off (identity crop, no flip, no colour, no blur) unless overridden."""
  cfg = dict(
      crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, jitter_prob=0.0, brightness=0.0,
      contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0,
      blur_sigma=(0.1, 2.0),
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _images(b, h, w, c, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, h, w, c), dtype=np.float32))


@pytest.mark.parametrize(
    "strength,channels,dtype",
    [("simclr", 3, jnp.float32), ("simclr", 3, jnp.bfloat16), ("digits", 1, jnp.float32)],
)
def test_augment_keeps_shape_range_and_is_deterministic(strength, channels, dtype):
  cfg = augment.default_aug_config(strength)
  x = jnp.repeat(_images(1, 12, 12, channels), 8, axis=0).astype(dtype)  # 8 copies of one image
  y = augment.augment_batch(jax.random.key(0), x, cfg)
  assert y.shape == x.shape and y.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  y32 = np.asarray(y, np.float32)
  # Per-example keys: the 8 copies of one image all come out different.
  assert all(not np.allclose(y32[i], y32[j]) for i in range(8) for j in range(i))
  again = augment.augment_batch(jax.random.key(0), x, cfg)
  np.testing.assert_array_equal(np.asarray(again, np.float32), y32)
  other = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg), np.float32)
  assert not np.allclose(other, y32)
  if channels == 3:
    # Every op is well defined on gray RGB input: the output stays gray (R = G = B).
    gray = np.asarray(augment.augment_batch(jax.random.key(2), x[..., :1].repeat(3, -1), cfg))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(gray[..., 1:], np.repeat(gray[..., :1], 2, -1), atol=tol)


def test_augment_under_jit_and_views():
  digits_cfg = augment.default_aug_config("digits")
  gray = jnp.repeat(_images(1, 12, 12, 1), 8, axis=0)
  eager = augment.augment_batch(jax.random.key(3), gray, digits_cfg)
  jitted = jax.jit(lambda k, im: augment.augment_batch(k, im, digits_cfg))(jax.random.key(3), gray)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  cfg = augment.default_aug_config("simclr")
  x = jnp.repeat(_images(1, 12, 12, 3), 8, axis=0)
  views = augment.make_views(jax.random.key(4), x, 2, cfg)
  assert views.shape == (2, 8, 12, 12, 3)
  assert not np.allclose(views[0], views[1])
  asym = augment.make_views(jax.random.key(4), x, 2, [cfg, _config()])
  np.testing.assert_allclose(asym[1], x, atol=1e-6)  # the second view's config is the identity
  with pytest.raises(ValueError, match="one per view"):
    augment.make_views(jax.random.key(4), x, 3, [cfg, cfg])
  with pytest.raises(ValueError, match="num_views"):
    augment.make_views(jax.random.key(4), x, 0, cfg)


def test_augment_examples_with_per_example_keys_is_augment_batch_and_make_views_a_slice_at_a_time():
  """Per-example keys (`example_keys`) give exactly `augment_batch` / `make_views` of the whole batch,
  and the augmentation of any slice of examples (with its slice of the keys) is that slice of the
  result: gradient caching augments each chunk on its own."""
  cfg = augment.default_aug_config("simclr")
  x = _images(8, 12, 12, 3)
  key = jax.random.key(5)
  one = augment.augment_examples(augment.example_keys(key, 8), x, cfg)
  np.testing.assert_array_equal(one, augment.augment_batch(key, x, cfg))
  keys = augment.example_keys(key, 8, 2)
  views = augment.augment_examples(keys, x, cfg)
  np.testing.assert_array_equal(views, augment.make_views(key, x, 2, cfg))
  np.testing.assert_array_equal(augment.augment_examples(keys[3:6], x[3:6], cfg), views[:, 3:6])
  assert not np.allclose(views[:, 0], views[:, 1])


def _bilinear_reference(image, box, out_shape=None):
  """float64 NumPy: sample the box (top, left, h, w) at the output's pixel centres, clamped."""
  image = np.asarray(image, np.float64)
  hh, ww = image.shape[:2]
  oh, ow = out_shape or (hh, ww)
  top, left, h, w = (float(v) for v in box)
  out = np.zeros((oh, ow, image.shape[2]))
  for i in range(oh):
    for j in range(ow):
      y = min(max(top + (i + 0.5) * h / oh - 0.5, 0.0), hh - 1.0)
      x = min(max(left + (j + 0.5) * w / ow - 0.5, 0.0), ww - 1.0)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, hh - 1), min(x0 + 1, ww - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * (1 - fx) * image[y0, x0] + (1 - fy) * fx * image[y0, x1]
                   + fy * (1 - fx) * image[y1, x0] + fy * fx * image[y1, x1])
  return out


def test_crop_and_resize_matches_reference():
  x = np.asarray(_images(1, 9, 7, 2)[0])
  boxes = ([0.0, 0.0, 9.0, 7.0], [1.3, 0.7, 4.2, 5.1], [4.0, 2.5, 3.0, 3.0], [0.2, 3.1, 8.5, 2.0])
  for box in boxes:
    got = augment.crop_and_resize(jnp.asarray(x), jnp.asarray(box, jnp.float32))
    np.testing.assert_allclose(got, _bilinear_reference(x, box), atol=2e-5)


def test_crop_boxes_respect_scale_and_ratio():
  keys = jax.random.split(jax.random.key(0), 512)
  sample = lambda k: augment.sample_crop_box(k, 16, 24, (0.2, 0.6), (0.5, 2.0))  # noqa: E731
  boxes = np.asarray(jax.vmap(sample)(keys))
  top, left, h, w = boxes.T
  area = h * w / (16 * 24)
  assert np.all(area >= 0.2 - 1e-5) and np.all(area <= 0.6 + 1e-5)
  assert np.all(w / h >= 0.5 - 1e-5) and np.all(w / h <= 2.0 + 1e-5)
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 16 + 1e-4) and np.all(left + w <= 24 + 1e-4)
  assert area.std() > 0.05 and top.std() > 0.5  # varied sizes and positions
  # An impossible aspect (every candidate too wide) falls back to the central box of clamped aspect.
  fallback = np.asarray(augment.sample_crop_box(jax.random.key(1), 8, 8, (1.0, 1.0), (3.0, 4.0)))
  np.testing.assert_allclose(fallback, [(8 - 8 / 3) / 2, 0.0, 8 / 3, 8.0], atol=1e-5)


def test_random_resized_crop_zooms_into_a_ramp():
  ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 16)[None, :, None], (16, 16, 1))
  x = jnp.broadcast_to(ramp, (8, 16, 16, 1))
  y = np.asarray(augment.augment_batch(jax.random.key(2), x, _config(crop_scale=(0.25, 0.25))))
  step = 1.0 / 15
  # A quarter of the area at aspect 1 is an 8x8 box: resampled to 16x16, the ramp's slope halves.
  np.testing.assert_allclose(np.diff(y[:, :, 1:-1, 0], axis=2), step / 2, atol=1e-5)
  starts = y[:, 0, 1, 0]
  assert np.all(y[..., 0].max(axis=(1, 2)) - y[..., 0].min(axis=(1, 2)) < 0.56)  # half the range
  assert starts.std() > 0.02  # the crop position varies across examples
  np.testing.assert_allclose(augment.augment_batch(jax.random.key(2), x, _config()), x, atol=1e-6)


def test_flip_and_channels():
  x = _images(16, 6, 6, 1, seed=5)
  y = np.asarray(augment.augment_batch(jax.random.key(0), x, _config(flip=True)))
  same = [np.allclose(y[i], x[i], atol=1e-6) for i in range(16)]
  mirrored = [np.allclose(y[i], x[i, :, ::-1], atol=1e-6) for i in range(16)]
  assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
  # The colour-only ops are skipped (the identity) on one-channel images.
  colour = _config(jitter_prob=1.0, saturation=0.9, hue=0.4, grayscale_prob=1.0)
  gray = x[:4]
  out = augment.augment_batch(jax.random.key(0), gray, colour)
  np.testing.assert_allclose(out, gray, atol=1e-6)
  # Saturation and hue leave a gray RGB image unchanged.
  gray_rgb = jnp.repeat(gray[0], 3, axis=-1)
  jittered = augment.color_jitter(jax.random.key(1), gray_rgb, 0.0, 0.0, 0.9, 0.4)
  np.testing.assert_allclose(jittered, gray_rgb, atol=1e-5)
  # Grayscale of a colour image: Rec. 601 luma in every channel.
  rgb = _images(2, 6, 6, 3, seed=6)
  g = np.asarray(augment.grayscale(rgb[0]))
  want = np.asarray(rgb[0], np.float64) @ np.array([0.2989, 0.5870, 0.1140])
  for c in range(3):
    np.testing.assert_allclose(g[..., c], want, atol=1e-6)
  np.testing.assert_array_equal(augment.grayscale(gray[0]), gray[0])


def test_brightness_is_a_bounded_factor():
  x = 0.2 + 0.5 * _images(8, 6, 6, 1)  # in [0.2, 0.7]: x * (1 ± 0.4) stays inside [0, 1]
  cfg = _config(jitter_prob=1.0, brightness=0.4)
  y = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg))
  factor = y / np.asarray(x)
  per_example = factor.reshape(8, -1)
  np.testing.assert_allclose(per_example, np.broadcast_to(per_example[:, :1], (8, 36)), rtol=1e-5)
  assert np.all(per_example >= 0.6 - 1e-6) and np.all(per_example <= 1.4 + 1e-6)
  assert per_example[:, 0].std() > 0.05


def _blur_reference(image, sigma):
  image = np.asarray(image, np.float64)
  radius = max(1, int(0.1 * image.shape[0]) // 2)
  t = np.arange(-radius, radius + 1)
  k = np.exp(-t**2 / (2 * sigma**2))
  k /= k.sum()
  p = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  rows = sum(k[a] * p[a:a + h, :, :] for a in range(len(k)))
  return sum(k[a] * rows[:, a:a + w, :] for a in range(len(k)))


def test_gaussian_blur_matches_reference():
  for size, sigma in ((8, 0.7), (40, 1.5)):
    x = _images(1, size, size, 3, seed=size)[0]
    want = _blur_reference(x, sigma)
    np.testing.assert_allclose(augment.gaussian_blur(x, sigma), want, atol=1e-5)


def test_bad_aug_inputs():
  cfg = augment.default_aug_config("simclr")
  x = _images(2, 8, 8, 3)
  with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
    augment.augment_batch(jax.random.key(0), x, {**cfg.to_dict(), "colour": 1.0})
  with pytest.raises(ValueError, match="missing keys \\['hue'\\]"):
    no_hue = {k: v for k, v in cfg.to_dict().items() if k != "hue"}
    augment.augment_batch(jax.random.key(0), x, no_hue)
  with pytest.raises(ValueError, match="crop_scale"):
    augment.augment_batch(jax.random.key(0), x, _config(crop_scale=(0.5, 0.2)))
  with pytest.raises(ValueError, match="jitter_prob"):
    augment.augment_batch(jax.random.key(0), x, _config(jitter_prob=1.5))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    augment.augment_batch(jax.random.key(0), _images(2, 8, 8, 2), cfg)
  with pytest.raises(ValueError, match="rank 4"):
    augment.augment_batch(jax.random.key(0), x[0], cfg)
  with pytest.raises(ValueError, match="strength"):
    augment.default_aug_config("strong")
