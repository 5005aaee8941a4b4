"""The tfds backend of `jaxcl.data.sources`: the bundled digits and any prepared random-access tfds
dataset, read through `tfds.data_source` (data config names "digits" and "tfds").

What works without TensorFlow (it is not a dependency): `tfds.data_source` reads datasets prepared in a
random-access format (ArrayRecord: `tfds build --file_format=array_record`, or
`builder.download_and_prepare(file_format="array_record")`); TFRecord-only datasets are rejected with
a message saying so. Features may be `tfds.features.Tensor` (uint8, uint16, bool or float in [0, 1]),
`tfds.features.Image` (tfds decodes the PNG/JPEG bytes with Pillow) or encoded image bytes (decoded here
with Pillow, `jaxcl.data.images`); `ClassLabel` or integer labels; `Text` captions. Nothing is ever
downloaded: the digits are written from scikit-learn (`prepare_digits`), tfds reads its data_dir
(a local path or a URI) through epath itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from jaxcl import _paths
from jaxcl.data import digits
from jaxcl.data import images
from jaxcl.data.source_info import GENERIC_CAPTION_TEMPLATES, SourceInfo, config_image_size, config_value

DIGITS_DATA_DIR = "~/.cache/jaxcl/tfds"


def prepare_digits(data_dir: str | os.PathLike[str] | None = None) -> str:
  """Writes the digits ArrayRecord files into `data_dir` if they are not there; returns the data_dir.

  No download: the data comes from scikit-learn. Safe when several processes race to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  data_dir = os.path.expanduser(os.fspath(data_dir or DIGITS_DATA_DIR))
  if (epath.Path(data_dir) / digits.NAME / digits.VERSION / "dataset_info.json").exists():
    return data_dir
  builder = digits.Digits(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    logging.info("Writing the scikit-learn digits as ArrayRecord into %s", data_dir)
    try:
      # tfds prints its banner to stdout; keep stdout for the program's own output.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except Exception:  # pylint: disable=broad-except
      # Another process may have finished the same preparation first.
      if not digits.Digits(data_dir=data_dir, file_format="array_record").is_prepared():
        raise
  return data_dir


def open_tfds(tfds_name: str, split: str, data_dir: str | None, **options):
  """`tfds.data_source(tfds_name, split=, data_dir=, download=False, **options)`, its errors told as a
  ValueError naming `data_config.tfds_name` (not prepared, or prepared as TFRecord only)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  where = f"in data_dir {data_dir!r}" if data_dir else "in the default tfds data_dir"
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False, **options)
  except NotImplementedError as e:
    raise ValueError(
        f"tfds dataset `data_config.tfds_name`={tfds_name!r} {where} is not stored in a "
        "random-access format; prepare it with `tfds build --file_format=array_record` "
        f"(TFRecord cannot be read without TensorFlow). Details: {e}"
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    details = str(e).strip().split("\n")[0][:300]
    raise ValueError(
        f"Cannot open tfds dataset `data_config.tfds_name`={tfds_name!r} split {split!r} {where}: "
        f"it must be prepared on disk (nothing is downloaded at run time). Details: "
        f"{type(e).__name__}: {details}"
    ) from e


def caption_text(caption: Any) -> str:
  """A tfds `Text` feature's value (bytes, str or a 0-d array of either) as a str."""
  if isinstance(caption, np.ndarray):
    caption = caption.item()
  return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


class TfdsSource:
  """A prepared tfds dataset read through `tfds.data_source`, converted to the jaxcl example dict.

  The tfds data source is opened lazily (and dropped when pickled), so the object travels to grain
  worker processes. `channels` (1 or 3; None: each image's own) is what encoded image bytes decode to.
  """

  def __init__(
      self,
      tfds_name: str,
      split: str,
      *,
      data_dir: str | None = None,
      image_size: int = 0,
      image_key: str = "image",
      label_key: str = "label",
      caption_key: str | None = None,
      index_key: str | None = None,
      caption_templates: Sequence[str] | None = None,
      class_names: Sequence[str] = (),
  ):
    self.tfds_name = tfds_name
    self.split = split
    self.data_dir = data_dir
    self.image_size = image_size
    self.image_key = image_key
    self.label_key = label_key
    self.caption_key = caption_key
    self.index_key = index_key
    self.caption_templates = tuple(caption_templates) if caption_templates else None
    self.class_names = tuple(class_names)
    self.channels = None
    self._ds = None
    self._len = len(self.tfds_data_source())

  def tfds_data_source(self):
    """The underlying `tfds.data_source` (opened on first use; its `dataset_info` has the features)."""
    if self._ds is None:
      self._ds = open_tfds(self.tfds_name, self.split, self.data_dir)
    return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (
        # No data_dir: a resumed run may read a copy of the same data elsewhere (grain checks repr).
        f"TfdsSource(tfds_name={self.tfds_name!r}, split={self.split!r}, "
        f"image_size={self.image_size}, num_examples={self._len})"
    )

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(f"index {i} out of range for {self!r}.")
    example = self.tfds_data_source()[i]
    what = f"example {i} of tfds dataset {self.tfds_name!r} ({self.split})"
    raw = example[self.image_key]
    if isinstance(raw, (bytes, np.bytes_)) or (isinstance(raw, np.ndarray) and raw.dtype == object):
      raw = raw.item() if isinstance(raw, np.ndarray) else raw
      image = images.decode_bytes(bytes(raw), self.channels, what)
    else:
      image = images.to_float01(raw, what=f"`{self.image_key}` of {what}")
    image = images.resize_square(image, self.image_size)
    label = int(example[self.label_key]) if self.label_key in example else -1
    index = int(example[self.index_key]) if self.index_key else i
    out = {"image": image, "label": np.int32(label), "index": np.int32(index)}
    if self.caption_key:
      out["caption"] = caption_text(example[self.caption_key])
    elif self.caption_templates:
      # A fixed caption per example; training loaders re-draw the template every epoch.
      out["caption"] = digits.captions_for_labels(
          [label], np.random.default_rng(index), self.caption_templates, self.class_names
      )[0]
    return out


def _tfds_config(config: Any, split: str, *, digits_data: bool) -> TfdsSource:
  """The `TfdsSource` a data config names ("digits": prepared first; "tfds": `data_config.tfds_name`)."""
  image_size = config_image_size(config)
  if digits_data:
    data_dir = prepare_digits(config_value(config, "data_dir", "") or DIGITS_DATA_DIR)
    return TfdsSource(
        digits.NAME, split, data_dir=data_dir, image_size=image_size, index_key="index",
        caption_templates=digits.CAPTION_TEMPLATES, class_names=digits.CLASS_NAMES,
    )
  tfds_name = config_value(config, "tfds_name", "")
  if not tfds_name or not isinstance(tfds_name, str):
    raise ValueError(
        f"`data_config.tfds_name` must name a prepared tfds dataset, got {tfds_name!r}."
    )
  data_dir = config_value(config, "data_dir", "") or None
  data_dir = os.path.expanduser(data_dir) if data_dir and _paths.is_local(data_dir) else data_dir
  return TfdsSource(
      tfds_name, split, data_dir=data_dir, image_size=image_size,
      image_key=config_value(config, "image_key", "image"),
      label_key=config_value(config, "label_key", "label"),
      caption_key=config_value(config, "caption_key", "") or None,
  )


def build(config: Any, split: str, *, digits_data: bool) -> tuple[TfdsSource, SourceInfo]:
  """(source, info) of `split` of the digits (`digits_data`) or of `data_config.tfds_name`; the
  features named by the config are checked and one example decoded, so bad data fails here."""
  source = _tfds_config(config, split, digits_data=digits_data)
  features = source.tfds_data_source().dataset_info.features
  keys = tuple(features.keys())
  if source.image_key not in keys:
    raise ValueError(
        f"tfds dataset {source.tfds_name!r} has no image feature `data_config.image_key`="
        f"{source.image_key!r}; its features are {keys}."
    )
  if source.caption_key and source.caption_key not in keys:
    raise ValueError(
        f"tfds dataset {source.tfds_name!r} has no caption feature `data_config.caption_key`="
        f"{source.caption_key!r}; its features are {keys}."
    )
  if len(source) == 0:
    raise ValueError(f"tfds dataset {source.tfds_name!r} split {split!r} is empty.")
  num_classes, class_names = 0, ()
  if source.label_key in keys:
    label_feature = features[source.label_key]
    if hasattr(label_feature, "num_classes"):
      num_classes = int(label_feature.num_classes)
      class_names = tuple(label_feature.names)
  feature_shape = tuple(getattr(features[source.image_key], "shape", ()) or ())
  if len(feature_shape) == 3 and feature_shape[-1] in (1, 3, 4) and feature_shape[-1] is not None:
    source.channels = feature_shape[-1]
  first = source[0]["image"]  # decodes one example: bad features fail here, before any compute
  image_size = source.image_size
  if image_size == 0 and (len(feature_shape) != 3 or None in feature_shape[:2]):
    raise ValueError(
        f"tfds dataset {source.tfds_name!r} has images of variable size {feature_shape}: set "
        "`data_config.image_size` to resize them to a square."
    )
  info = SourceInfo(
      num_examples=len(source), image_shape=tuple(int(d) for d in first.shape), num_classes=num_classes,
      class_names=class_names, has_captions=bool(source.caption_key or source.caption_templates),
      captions_from_labels=bool(source.caption_templates),
      caption_templates=source.caption_templates or GENERIC_CAPTION_TEMPLATES,
      # the digits' ids are positions in load_digits(), over both splits
      num_ids=digits.NUM_EXAMPLES if digits_data else len(source))
  return source, info


def read_captions(config: Any, split: str) -> tuple[str, ...]:
  """Every caption of `split` of `data_config.tfds_name` in order (its `data_config.caption_key`
  feature), read without decoding the images; () when the config names no caption feature."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if not config_value(config, "caption_key", ""):
    return ()
  source = _tfds_config(config, split, digits_data=False)
  # the encoded images stay bytes (tfds' data sources take no PartialDecoding)
  records = open_tfds(source.tfds_name, split, source.data_dir,
                      decoders={source.image_key: tfds.decode.SkipDecoding()})
  return tuple(caption_text(records[i][source.caption_key]) for i in range(len(records)))
