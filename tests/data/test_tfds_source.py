"""jaxcl.data.tfds_source: the digits and a tiny PNG tfds dataset read through `tfds.data_source`."""

import pickle

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxcl.data import digits, sources, tfds_source
from tests.helpers import digits_config, pattern, png_bytes


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
      image = png_bytes(pattern(i, 5, 6, 3))
      yield i, {"image": image, "label": i % 3, "caption": f"picture {i}", "id": i}


def _no_decoding(*args, **kwargs):
  raise AssertionError("an image was decoded")


def test_tfds_source_with_png_images(tmp_path, monkeypatch):
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
    np.testing.assert_array_equal(ex["image"], pattern(i, 5, 6, 3)[:, :5] / np.float32(255))
    assert ex["label"] == i % 3 and ex["index"] == k and "caption" not in ex
  # Captions from a Text feature, and resizing the variable-size Image feature.
  cfg.update(dict(caption_key="caption", image_size=4))
  source, info = sources.build_source(cfg, "test")
  assert info.image_shape == (4, 4, 3) and info.has_captions
  assert sorted(source[k]["caption"] for k in range(3)) == ["picture 6", "picture 7", "picture 8"]
  # The captions alone (a text tower's vocabulary reads them), in the source's order, no image decoded.
  captions = tuple(source[k]["caption"] for k in range(3))
  with monkeypatch.context() as patch:
    patch.setattr(PIL.Image, "open", _no_decoding)
    assert sources.read_captions(cfg, "test") == tfds_source.read_captions(cfg, "test") == captions
  assert sources.read_captions(dict(cfg, caption_key=""), "test") == ()
  cfg.update(dict(image_size=0, caption_key=""))
  with pytest.raises(ValueError, match="variable size"):
    sources.build_source(cfg, "train")
  cfg.update(dict(image_size=4, image_key="pixels"))
  with pytest.raises(ValueError, match="image_key"):
    sources.build_source(cfg, "train")
  cfg.update(dict(image_key="image", tfds_name="jaxcl_no_such_dataset"))
  with pytest.raises(ValueError, match="jaxcl_no_such_dataset.*prepared on disk"):
    sources.build_source(cfg, "train")
