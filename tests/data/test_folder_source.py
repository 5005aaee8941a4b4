"""jaxcl.data.folder_source: image folders with class subfolders, split subfolders and captions files."""

import csv
import re

import numpy as np
import PIL.Image
import pytest

from jaxcl.data import sources
from tests.helpers import folder_config, pattern, save_image


def _no_decoding(*args, **kwargs):
  raise AssertionError("an image was decoded")


def test_folder_with_classes_and_tsv_captions(tmp_path, monkeypatch):
  names = {"bird": 2, "ant": 3}  # classes are sorted: ant = 0, bird = 1
  arrays = {}
  for cls, n in names.items():
    for k in range(n):
      arrays[f"{cls}/img{k}.png"] = pattern(len(arrays), 6, 5, 3)
      save_image(tmp_path / "data" / cls / f"img{k}.png", arrays[f"{cls}/img{k}.png"])
  (tmp_path / "data" / "notes.txt").write_text("not an image, ignored")
  (tmp_path / "data" / "ant" / "readme.md").write_text("ignored")
  captions = tmp_path / "captions.tsv"
  rows = "".join(f"{k}\ta {k}, with a comma\n" for k in arrays)
  captions.write_text("filename\tcaption\n" + rows)
  cfg = folder_config(tmp_path / "data", captions_file=str(captions))
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
  # The captions alone (a text tower's vocabulary reads them), in the source's order, no image decoded.
  with monkeypatch.context() as patch:
    patch.setattr(PIL.Image, "open", _no_decoding)
    assert sources.read_captions(cfg, "train") == tuple(f"a {key}, with a comma" for key in order)
  assert sources.read_captions(folder_config(tmp_path / "data"), "train") == ()  # no captions file


def test_folder_flat_grayscale_csv_captions_and_splits(tmp_path):
  for k in range(3):
    save_image(tmp_path / "flat" / f"{k}.png", pattern(k, 4, 4, 1))
  with open(tmp_path / "caps.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerows([("0.png", "zero, quoted"), ("1.png", "one"), ("2.png", "two"), ("x.png", "unused")])
  cfg = folder_config(tmp_path / "flat", captions_file=str(tmp_path / "caps.csv"))
  source, info = sources.build_source(cfg, "any")
  assert info.num_classes == 0 and info.image_shape == (4, 4, 1)
  assert [source[i]["label"] for i in range(3)] == [-1, -1, -1]
  assert source[0]["caption"] == "zero, quoted"
  np.testing.assert_array_equal(source[2]["image"], pattern(2, 4, 4, 1) / np.float32(255))
  # Split subfolders.
  save_image(tmp_path / "split" / "train" / "a" / "0.png", pattern(0, 4, 4, 3))
  save_image(tmp_path / "split" / "test" / "a" / "0.png", pattern(1, 4, 4, 3))
  save_image(tmp_path / "split" / "test" / "b" / "0.png", pattern(2, 4, 4, 3))
  assert len(sources.build_source(folder_config(tmp_path / "split"), "train")[0]) == 1
  test_source, test_info = sources.build_source(folder_config(tmp_path / "split"), "test")
  assert len(test_source) == 2 and test_info.class_names == ("a", "b")
  with pytest.raises(ValueError, match="split subfolders.*'validation'"):
    sources.build_source(folder_config(tmp_path / "split"), "validation")


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*contains no images"):
    sources.build_source(folder_config(empty), "train")
  with pytest.raises(ValueError, match="is not a directory"):
    sources.build_source(folder_config(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match="data_config.folder"):
    sources.build_source(folder_config(""), "train")

  bad = tmp_path / "bad"
  save_image(bad / "good.png", pattern(0, 4, 4, 3))
  (bad / "broken.png").write_bytes(b"this is not a png")
  with pytest.raises(ValueError, match=f"Unreadable image.*{re.escape(str(bad / 'broken.png'))}"):
    sources.build_source(folder_config(bad), "train")
  truncated = tmp_path / "truncated"
  save_image(truncated / "a.png", pattern(0, 16, 16, 3))
  data = (truncated / "a.png").read_bytes()
  (truncated / "a.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="Unreadable image.*a.png"):
    sources.build_source(folder_config(truncated), "train")

  ok = tmp_path / "ok"
  for k in range(3):
    save_image(ok / f"{k}.png", pattern(k, 4, 4, 3))
  caps = tmp_path / "partial.tsv"
  caps.write_text("0.png\tzero\n2.png\ttwo\n")
  with pytest.raises(ValueError, match=f"{re.escape(str(caps))}.*no caption for 1 of 3.*1.png"):
    sources.build_source(folder_config(ok, captions_file=str(caps)), "train")
  caps.write_text("0.png\tzero\n1.png\n2.png\ttwo\n")
  with pytest.raises(ValueError, match="line 2"):
    sources.build_source(folder_config(ok, captions_file=str(caps)), "train")
  caps.write_text("0.png\tzero\n0.png\tagain\n")
  with pytest.raises(ValueError, match="appears twice"):
    sources.build_source(folder_config(ok, captions_file=str(caps)), "train")
  with pytest.raises(ValueError, match="does not exist"):
    sources.build_source(folder_config(ok, captions_file=str(tmp_path / "none.tsv")), "train")

  sizes = tmp_path / "sizes"
  save_image(sizes / "a.png", pattern(0, 4, 4, 3))
  save_image(sizes / "b.png", pattern(1, 5, 4, 3))
  with pytest.raises(ValueError, match="different sizes.*image_size"):
    sources.build_source(folder_config(sizes), "train")
  source, info = sources.build_source(folder_config(sizes, image_size=3), "train")
  assert info.image_shape == (3, 3, 3) and source[1]["image"].shape == (3, 3, 3)

  mixed = tmp_path / "mixed"
  save_image(mixed / "cls" / "a.png", pattern(0, 4, 4, 3))
  save_image(mixed / "loose.png", pattern(1, 4, 4, 3))
  with pytest.raises(ValueError, match="mixes class subfolders"):
    sources.build_source(folder_config(mixed), "train")
  empty_class = tmp_path / "empty_class"
  save_image(empty_class / "cls" / "a.png", pattern(0, 4, 4, 3))
  (empty_class / "nothing").mkdir()
  with pytest.raises(ValueError, match=f"{re.escape(str(empty_class / 'nothing'))}.*no images"):
    sources.build_source(folder_config(empty_class), "train")
