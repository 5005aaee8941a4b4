"""Random-access image sources for grain: the bundled digits, prepared tfds datasets, local folders.

`build_source(data_config, split)` returns `(source, info)`. The source has `len()` and
`source[i] -> dict` with

    image    (H, W, C) float32 in [0, 1]
    label    int32 (-1 when the data has no labels)
    index    int32, a stable example id (the dataset's own id where it has one, else the position)
    caption  str, only when the data has captions

and is picklable (grain worker processes) with a `repr` that is stable across runs (grain stores it in
iterator checkpoints). `info` is a `SourceInfo`: what the rest of jaxcl learns about the split (its
size, image shape, classes, captions and caption templates, and the range of its example ids).

`data_config` is an `ml_collections.ConfigDict` (or a dict) with keys
    name           "digits" | "tfds" | "folder"
    data_dir       where tfds data is prepared / read ("digits": default "~/.cache/jaxcl/tfds")
    tfds_name      "tfds": a dataset name as `tfds.data_source` takes it ("mnist", "my_ds:1.0.0")
    folder         "folder": the image folder
    captions_file  "folder": optional TSV/CSV of filename,caption
    image_size     resize to image_size x image_size (0 keeps the native size)
and, optionally, image_key / label_key / caption_key (the tfds feature names; "image", "label", none).

What works without TensorFlow (it is not a dependency): `tfds.data_source` reads datasets prepared in a
random-access format (ArrayRecord: `tfds build --file_format=array_record`, or
`builder.download_and_prepare(file_format="array_record")`); TFRecord-only datasets are rejected with
a message saying so. Features may be `tfds.features.Tensor` (uint8, uint16, bool or float in [0, 1]),
`tfds.features.Image` (tfds decodes the PNG/JPEG bytes with Pillow) or encoded image bytes (decoded here
with Pillow); `ClassLabel` or integer labels; `Text` captions. Nothing is ever downloaded.

"folder": `folder/<split>/` is used when it exists (e.g. folder/train, folder/test), else `folder`
itself serves every split. Inside it, class subfolders give labels (sorted names, ImageFolder style);
images directly in it get label -1. Images are decoded with Pillow: grayscale when every image is
8/16-bit grayscale, else RGB (alpha dropped). Every image is decoded once by `build_source`, so an
unreadable file is an error before any compute, as are an empty folder, mixed sizes with image_size 0,
and a captions file that misses an image.

Every path (data_dir, folder, captions_file) is a local path or a URI `etils.epath` opens (`gs://bucket/
images`, `jaxcl._paths`): folders are listed and images and captions read through epath (tfds reads its
data_dir through epath itself).

Resizing (image_size > 0) scales the shorter side to image_size (bilinear, antialiased, Pillow) and
takes the central square.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from jaxcl import _checks
from jaxcl import _paths
from jaxcl.data import digits

DIGITS_DATA_DIR = "~/.cache/jaxcl/tfds"
SOURCE_NAMES = ("digits", "tfds", "folder")
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
SPLIT_FOLDERS = ("train", "test", "validation", "val")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Label → text for data without templates of its own: captions made from class labels (image–text
# training on a labelled folder or tfds dataset) and zero-shot prompts (CLIP's prompt style).
GENERIC_CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What a data source tells the rest of jaxcl about one split (`build_source`, `abstract_info`)."""

  num_examples: int
  image_shape: tuple[int, int, int]  # (H, W, C) of every example's image
  num_classes: int  # 0: no labels
  class_names: tuple[str, ...]  # one per class
  has_captions: bool  # every example carries a "caption"
  captions_from_labels: bool  # those captions are `caption_templates` filled with the class name
  caption_templates: tuple[str, ...]  # label → text ("a photo of a {}."): made captions, zero-shot prompts
  num_ids: int  # the stable example ids (`index`) lie in [0, num_ids)


def default_data_config(name: str = "digits"):
  """A ConfigDict with every key `build_source` reads, for `name` in ("digits", "tfds", "folder").

  >>> cfg = default_data_config()
  >>> cfg.name, cfg.data_dir, cfg.image_size
  ('digits', '~/.cache/jaxcl/tfds', 0)
  """
  import ml_collections  # pylint: disable=import-outside-toplevel

  _checks.check_choice("name", name, SOURCE_NAMES)
  return ml_collections.ConfigDict({
      "name": name,
      "data_dir": DIGITS_DATA_DIR if name == "digits" else "",
      "tfds_name": "",
      "folder": "",
      "captions_file": "",
      "image_size": 0,
  })


def config_value(config: Any, key: str, default: Any = None) -> Any:
  """config[key] for a ConfigDict, dict or attribute object; `default` when absent or None."""
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def _image_size(config: Any) -> int:
  size = config_value(config, "image_size", 0)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
    raise ValueError(f"`data_config.image_size` must be an integer >= 0, got {size!r}.")
  return int(size)


# --------------------------------------------------------------------------------------------------
# Pixel conversion and resizing (NumPy / Pillow, on the host).


def to_float01(image: Any, *, what: str = "image") -> np.ndarray:
  """An (H, W, C) image as float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool, or float (clipped).

  >>> to_float01(np.array([[[0], [255]]], np.uint8))[..., 0].tolist()
  [[0.0, 1.0]]
  """
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise ValueError(f"{what} must have shape (H, W, C) or (H, W), got shape {a.shape}.")
  if a.dtype == np.uint8:
    return a.astype(np.float32) / np.float32(255.0)
  if a.dtype == np.uint16:
    return a.astype(np.float32) / np.float32(65535.0)
  if a.dtype == np.bool_:
    return a.astype(np.float32)
  if np.issubdtype(a.dtype, np.floating):
    return np.clip(a.astype(np.float32), 0.0, 1.0)
  raise TypeError(f"{what} must be uint8, uint16, bool or float, got dtype {a.dtype}.")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Scales the shorter side of a float (H, W, C) image to `size` and keeps the central square.

  Bilinear with Pillow's antialiasing when shrinking; channels are resized one by one in float ("F")
  mode, so there is no 8-bit rounding. `size == 0` returns the image unchanged.

  >>> resize_square(np.ones((8, 6, 1), np.float32), 4).shape
  (4, 4, 1)
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if size == 0 or image.shape[:2] == (size, size):
    return image
  h, w = image.shape[:2]
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  box = (left, top, left + size, top + size)
  channels = []
  for c in range(image.shape[2]):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    plane = plane.resize((new_w, new_h), Image.Resampling.BILINEAR).crop(box)
    channels.append(np.asarray(plane, np.float32))
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def _decode_bytes(data: bytes, channels: int | None, what: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with Image.open(io.BytesIO(data)) as im:
      return _pil_to_float(im, channels or (1 if im.mode in _GRAY_MODES else 3))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{what}: cannot decode the encoded image bytes ({e}).") from e


def _pil_to_float(im: Any, channels: int) -> np.ndarray:
  if channels == 1:
    if im.mode in _HIGH_BIT_MODES:
      return np.clip(np.asarray(im, np.float32) / np.float32(65535.0), 0.0, 1.0)[..., None]
    return np.asarray(im.convert("L"), np.float32)[..., None] / np.float32(255.0)
  if im.mode in _HIGH_BIT_MODES:
    gray = np.clip(np.asarray(im, np.float32) / np.float32(65535.0), 0.0, 1.0)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"), np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------------
# tfds (the bundled digits and any prepared random-access tfds dataset).


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


def _open_tfds(tfds_name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  where = f"in data_dir {data_dir!r}" if data_dir else "in the default tfds data_dir"
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
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


class TfdsSource:
  """A prepared tfds dataset read through `tfds.data_source`, converted to the jaxcl example dict.

  The tfds data source is opened lazily (and dropped when pickled), so the object travels to grain
  worker processes.
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
    self._ds = None
    self._len = len(self._source())
    self._channels = None

  def _source(self):
    if self._ds is None:
      self._ds = _open_tfds(self.tfds_name, self.split, self.data_dir)
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
    example = self._source()[i]
    what = f"example {i} of tfds dataset {self.tfds_name!r} ({self.split})"
    raw = example[self.image_key]
    if isinstance(raw, (bytes, np.bytes_)) or (isinstance(raw, np.ndarray) and raw.dtype == object):
      raw = raw.item() if isinstance(raw, np.ndarray) else raw
      image = _decode_bytes(bytes(raw), self._channels, what)
    else:
      image = to_float01(raw, what=f"`{self.image_key}` of {what}")
    image = resize_square(image, self.image_size)
    label = int(example[self.label_key]) if self.label_key in example else -1
    index = int(example[self.index_key]) if self.index_key else i
    out = {"image": image, "label": np.int32(label), "index": np.int32(index)}
    if self.caption_key:
      caption = example[self.caption_key]
      if isinstance(caption, np.ndarray):
        caption = caption.item()
      out["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    elif self.caption_templates:
      # A fixed caption per example; training loaders re-draw the template every epoch.
      out["caption"] = digits.captions_for_labels(
          [label], np.random.default_rng(index), self.caption_templates, self.class_names
      )[0]
    return out


def _tfds_source(
    config: Any, split: str, *, digits_data: bool
) -> tuple[TfdsSource, SourceInfo]:
  image_size = _image_size(config)
  if digits_data:
    data_dir = prepare_digits(config_value(config, "data_dir", "") or DIGITS_DATA_DIR)
    source = TfdsSource(
        digits.NAME, split, data_dir=data_dir, image_size=image_size, index_key="index",
        caption_templates=digits.CAPTION_TEMPLATES, class_names=digits.CLASS_NAMES,
    )
  else:
    tfds_name = config_value(config, "tfds_name", "")
    if not tfds_name or not isinstance(tfds_name, str):
      raise ValueError(
          f"`data_config.tfds_name` must name a prepared tfds dataset, got {tfds_name!r}."
      )
    data_dir = config_value(config, "data_dir", "") or None
    data_dir = os.path.expanduser(data_dir) if data_dir and _paths.is_local(data_dir) else data_dir
    source = TfdsSource(
        tfds_name, split, data_dir=data_dir, image_size=image_size,
        image_key=config_value(config, "image_key", "image"),
        label_key=config_value(config, "label_key", "label"),
        caption_key=config_value(config, "caption_key", "") or None,
    )
  features = source._source().dataset_info.features  # pylint: disable=protected-access
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
    source._channels = feature_shape[-1]  # pylint: disable=protected-access
  first = source[0]["image"]  # decodes one example: bad features fail here, before any compute
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


# --------------------------------------------------------------------------------------------------
# A local folder of images.


class FolderSource:
  """Images listed at construction (already validated), decoded with Pillow on access."""

  def __init__(
      self,
      root: str,
      files: Sequence[str],
      labels: Sequence[int],
      *,
      captions: Sequence[str] | None = None,
      image_size: int = 0,
      channels: int = 3,
  ):
    self.root = root
    self.files = tuple(files)
    self.labels = np.asarray(labels, np.int32)
    self.captions = tuple(captions) if captions is not None else None
    self.image_size = image_size
    self.channels = channels

  def __len__(self) -> int:
    return len(self.files)

  def __repr__(self) -> str:
    return (
        # Only the folder's name: a resumed run may read a copy of the same data elsewhere.
        f"FolderSource(folder={os.path.basename(self.root.rstrip(os.sep))!r}, "
        f"num_examples={len(self.files)}, "
        f"image_size={self.image_size}, channels={self.channels}, "
        f"captions={self.captions is not None})"
    )

  def load_image(self, i: int) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    path = epath.Path(self.root) / self.files[i]
    try:
      with path.open("rb") as f, Image.open(f) as im:
        image = _pil_to_float(im, self.channels)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"Cannot read image {path!r}: {type(e).__name__}: {e}") from e
    return resize_square(image, self.image_size)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self.files):
      raise IndexError(f"index {i} out of range for {self!r}.")
    out = {"image": self.load_image(i), "label": self.labels[i], "index": np.int32(i)}
    if self.captions is not None:
      out["caption"] = self.captions[i]
    return out


def _data_path(path: str | os.PathLike[str]) -> epath.Path:
  """A data path as given (a local one with `~` expanded), opened through epath."""
  path = os.fspath(path)
  return epath.Path(os.path.expanduser(path) if _paths.is_local(path) else path)


def _is_image(path: epath.Path) -> bool:
  visible = not path.name.startswith(".")
  return visible and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _list_images(directory: epath.Path, recursive: bool) -> list[epath.Path]:
  if recursive:
    found = [root / name for root, _, files in directory.walk() for name in files]
  else:
    found = directory.iterdir()
  return sorted(p for p in found if _is_image(p))


def _split_root(folder: epath.Path, split: str) -> epath.Path:
  if (folder / split).is_dir():
    return folder / split
  present = [s for s in SPLIT_FOLDERS if (folder / s).is_dir()]
  if present:
    raise ValueError(
        f"Image folder {str(folder)!r} has split subfolders {present} but none named {split!r}."
    )
  return folder


def _probe_image(path: epath.Path) -> tuple[tuple[int, int], str]:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with path.open("rb") as f, Image.open(f) as im:
      im.load()  # a full decode: truncated files fail here, not in the middle of training
      return im.size, im.mode
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Unreadable image {str(path)!r}: {type(e).__name__}: {e}") from e


def read_captions_file(path: str | os.PathLike[str]) -> dict[str, str]:
  """{filename: caption} from a TSV (tab) or CSV file of `filename,caption` rows.

  The delimiter is a tab for .tsv/.txt files, else a comma (CSV quoting rules). An optional header
  row (`filename`, `file`, `path` or `image` first) is skipped; blank lines are skipped. A row without
  a caption, an empty caption or a repeated filename is an error naming the file and line.
  """
  path = _data_path(path)
  if not path.is_file():
    raise ValueError(f"`data_config.captions_file` {str(path)!r} does not exist.")
  tab = path.suffix.lower() in (".tsv", ".txt", ".tab")
  captions: dict[str, str] = {}
  with io.StringIO(path.read_bytes().decode("utf-8"), newline="") as f:
    rows = (line.rstrip("\r\n").split("\t") for line in f) if tab else csv.reader(f)
    for n, row in enumerate(rows, start=1):
      if not row or all(not c.strip() for c in row):
        continue
      if n == 1 and row[0].strip().lower() in ("filename", "file", "path", "image"):
        continue
      if len(row) < 2:
        sep = "<TAB>" if tab else ","
        raise ValueError(
            f"Captions file {str(path)!r} line {n}: expected 'filename{sep}caption', got {row!r}."
        )
      name, caption = row[0].strip(), ("\t" if tab else ",").join(row[1:]).strip()
      if not caption:
        raise ValueError(f"Captions file {str(path)!r} line {n}: empty caption for {name!r}.")
      if name in captions:
        raise ValueError(f"Captions file {str(path)!r} line {n}: {name!r} appears twice.")
      captions[name] = caption
  if not captions:
    raise ValueError(f"Captions file {str(path)!r} has no entries.")
  return captions


def _folder_source(config: Any, split: str) -> tuple[FolderSource, SourceInfo]:
  folder_name = config_value(config, "folder", "")
  if not folder_name:
    raise ValueError("`data_config.folder` must name a folder of images, got ''.")
  folder = _data_path(folder_name)
  if not folder.is_dir():
    raise ValueError(f"`data_config.folder` {str(folder)!r} is not a directory.")
  root = _split_root(folder, split)
  class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if class_dirs:
    loose = _list_images(root, recursive=False)
    if loose:
      raise ValueError(
          f"Image folder {str(root)!r} mixes class subfolders with {len(loose)} images outside "
          f"them (e.g. {str(loose[0])!r}): put every image in a class subfolder, or none."
      )
    paths, labels, class_names = [], [], []
    for class_dir in class_dirs:
      found = _list_images(class_dir, recursive=True)
      if not found:
        raise ValueError(f"Class folder {str(class_dir)!r} contains no images {IMAGE_EXTENSIONS}.")
      labels += [len(class_names)] * len(found)
      class_names.append(class_dir.name)
      paths += found
  else:
    paths = _list_images(root, recursive=False)
    labels, class_names = [-1] * len(paths), []
  if not paths:
    raise ValueError(f"Image folder {str(root)!r} contains no images {IMAGE_EXTENSIONS}.")

  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    probes = list(pool.map(_probe_image, paths))
  channels = 1 if all(mode in _GRAY_MODES for _, mode in probes) else 3
  image_size = _image_size(config)
  if image_size == 0:
    sizes = {size for size, _ in probes}
    if len(sizes) > 1:
      first = paths[0]
      other = next(p for p, (s, _) in zip(paths, probes) if s != probes[0][0])
      raise ValueError(
          f"Images in {str(root)!r} have different sizes (e.g. {str(first)!r} is "
          f"{probes[0][0]} and {str(other)!r} is {dict(zip(paths, probes))[other][0]}, as (W, H)): "
          "set `data_config.image_size` to resize them to a square."
      )
    width, height = probes[0][0]
    image_shape = (height, width, channels)
  else:
    image_shape = (image_size, image_size, channels)

  captions = None
  captions_file = config_value(config, "captions_file", "")
  if captions_file:
    captions_path = _data_path(captions_file)
    if not captions_path.is_absolute() and not captions_path.exists():
      captions_path = folder / captions_path
    table = read_captions_file(captions_path)
    captions, missing = [], []
    for p in paths:
      keys = (p.relative_to(root).as_posix(), p.relative_to(folder).as_posix(), p.name)
      caption = next((table[k] for k in keys if k in table), None)
      if caption is None:
        missing.append(p.relative_to(root).as_posix())
      captions.append(caption)
    if missing:
      raise ValueError(
          f"Captions file {str(captions_path)!r} has no caption for {len(missing)} of {len(paths)} "
          f"images in {str(root)!r}, e.g. {missing[:5]}."
      )
  source = FolderSource(
      str(root), [p.relative_to(root).as_posix() for p in paths], labels, captions=captions,
      image_size=image_size, channels=channels,
  )
  info = SourceInfo(
      num_examples=len(source), image_shape=tuple(image_shape), num_classes=len(class_names),
      class_names=tuple(class_names), has_captions=captions is not None, captions_from_labels=False,
      caption_templates=GENERIC_CAPTION_TEMPLATES, num_ids=len(source))
  return source, info


# --------------------------------------------------------------------------------------------------
# Public entry points.


def build_source(data_config: Any, split: str) -> tuple[Any, SourceInfo]:
  """A grain random-access source of example dicts for `split`, and its `SourceInfo`.

  See the module docstring for the keys of `data_config` and the example dict.

  >>> import tempfile
  >>> cfg = default_data_config("digits")
  >>> tmp = tempfile.TemporaryDirectory()
  >>> cfg.data_dir = tmp.name
  >>> source, info = build_source(cfg, "test")
  >>> len(source), info.image_shape, info.class_names[:2], source[0]["image"].dtype
  (359, (8, 8, 1), ('zero', 'one'), dtype('float32'))
  >>> tmp.cleanup()
  """
  name = config_value(data_config, "name", None)
  _checks.check_choice("data_config.name", name, SOURCE_NAMES)
  if not isinstance(split, str) or not split:
    raise ValueError(f"`split` must be a non-empty string such as 'train', got {split!r}.")
  if name == "folder":
    source, info = _folder_source(data_config, split)
  else:
    source, info = _tfds_source(data_config, split, digits_data=name == "digits")
  _check_declared(data_config, info)
  return source, info


# What a recipe may declare about its data (`abstract_info`), and the info key each one must match.
DECLARED_KEYS = {"num_classes": "num_classes", "channels": "image_shape"}


def _check_declared(data_config: Any, info: SourceInfo) -> None:
  """A declared `data_config.num_classes` / `channels` (what the planner compiled with) equals the data's."""
  for key, field in DECLARED_KEYS.items():
    declared = config_value(data_config, key, 0)
    actual = getattr(info, field)[-1] if field == "image_shape" else getattr(info, field)
    if declared and int(declared) != int(actual):
      raise ValueError(f"`data_config.{key}` is {declared} but the data has {actual}: fix the recipe "
                       f"(or drop the key).")


def abstract_info(data_config: Any, split: str) -> SourceInfo:
  """The `SourceInfo` of `build_source(data_config, split)` from the config alone, no data read (for
  compiling a run before the data is at hand, `jaxcl.plan`).

      image_shape  = (image_size, image_size, channels)     channels: `data_config.channels` or 3
      num_classes  = `data_config.num_classes` (0: none)    class_names = ("class0", …), placeholders
      num_examples = `data_config.num_examples` (0: unknown; only per-example loss state needs it)

  The bundled digits are read (they are small and always available). A tfds or folder source needs
  `image_size` > 0 (its native size is only known from the data). The placeholder class names give
  an image–text recipe a vocabulary of about the right size (one word per class).

  >>> info = abstract_info({"name": "tfds", "image_size": 224, "num_classes": 2}, "train")
  >>> info.image_shape, info.class_names
  ((224, 224, 3), ('class0', 'class1'))
  """
  name = config_value(data_config, "name", None)
  _checks.check_choice("data_config.name", name, SOURCE_NAMES)
  if name == "digits":
    return build_source(data_config, split)[1]
  size = _image_size(data_config)
  if size == 0:
    raise ValueError(f"`data_config.image_size` must be > 0 to plan a {name!r} source without reading "
                     "its data (the native image size is only known from the data), got 0.")
  values = {}
  for key, default in (("num_classes", 0), ("num_examples", 0), ("channels", 3)):
    value = config_value(data_config, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"`data_config.{key}` must be an integer >= 0, got {value!r}.")
    values[key] = int(value)
  if values["channels"] not in (1, 3):
    raise ValueError(f"`data_config.channels` must be 1 or 3, got {values['channels']}.")
  num_classes = values["num_classes"]
  return SourceInfo(
      num_examples=values["num_examples"], image_shape=(size, size, values["channels"]), num_classes=num_classes,
      class_names=tuple(f"class{i}" for i in range(num_classes)),
      has_captions=bool(config_value(data_config, "caption_key", "")), captions_from_labels=False,
      caption_templates=GENERIC_CAPTION_TEMPLATES, num_ids=values["num_examples"])


def load_arrays(data_config: Any, split: str) -> dict[str, Any]:
  """The whole split in memory, for evaluating on small datasets.

  Returns dict(image=(N, H, W, C) float32, label=(N,) int32, index=(N,) int32), plus
  caption=list[str] when the data has captions.

  >>> import tempfile
  >>> cfg = default_data_config("digits")
  >>> tmp = tempfile.TemporaryDirectory()
  >>> cfg.data_dir = tmp.name
  >>> arrays = load_arrays(cfg, "test")
  >>> arrays["image"].shape, arrays["label"].dtype, float(arrays["image"].max())
  ((359, 8, 8, 1), dtype('int32'), 1.0)
  >>> tmp.cleanup()
  """
  source, info = build_source(data_config, split)
  n = len(source)
  image = np.empty((n, *info.image_shape), np.float32)
  label = np.empty((n,), np.int32)
  index = np.empty((n,), np.int32)
  captions = []
  for i in range(n):
    example = source[i]
    if example["image"].shape != image.shape[1:]:
      raise ValueError(
          f"example {i} of {source!r} has image shape {example['image'].shape}, expected "
          f"{image.shape[1:]}: set `data_config.image_size`."
      )
    image[i], label[i], index[i] = example["image"], example["label"], example["index"]
    if "caption" in example:
      captions.append(example["caption"])
  out = {"image": image, "label": label, "index": index}
  if info.has_captions:
    out["caption"] = captions
  return out


def split_batches(data_config: Any, split: str, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> tuple[int, Any]:
  """The split read in order, `batch_size` examples per (global) batch, without loading it whole.

  Global batch g holds rows g·B … g·B + B − 1 of the split (B = `batch_size`); process p reads its
  share, rows g·B + p·b … g·B + (p + 1)·b − 1 (b = B / process_count), so the processes together
  cover every row once and nothing is read twice. Rows past the end (the last batch) are zero images.

  Returns (N, iterator): N the number of examples of the split, and an iterator of per-process dicts
  image (b, H, W, C) float32, label (b,) int32, row (b,) int32 (the row in the split, N − 1 past the
  end) and valid (b,) bool (False past the end); only one batch is in memory at a time.

  >>> import tempfile
  >>> cfg = default_data_config("digits")
  >>> tmp = tempfile.TemporaryDirectory()
  >>> cfg.data_dir = tmp.name
  >>> n, batches = split_batches(cfg, "test", 256)
  >>> n, [(b["image"].shape, int(b["valid"].sum())) for b in batches]
  (359, [((256, 8, 8, 1), 256), ((256, 8, 8, 1), 103)])
  >>> tmp.cleanup()
  """
  if not isinstance(process_count, int) or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"`process_index` must lie in [0, process_count) with `process_count` >= 1, got "
                     f"{process_index!r} and {process_count!r}.")
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"`batch_size` must be a positive multiple of process_count={process_count}, got "
                     f"{batch_size!r}.")
  source, info = build_source(data_config, split)
  n, b, shape = len(source), batch_size // process_count, tuple(info.image_shape)

  def batches():
    for start in range(0, n, batch_size):
      rows = start + process_index * b + np.arange(b)
      out = {"image": np.zeros((b, *shape), np.float32), "label": np.zeros((b,), np.int32),
             "row": np.minimum(rows, n - 1).astype(np.int32), "valid": rows < n}
      for j, i in enumerate(rows[rows < n]):
        example = source[int(i)]
        if example["image"].shape != shape:
          raise ValueError(
              f"example {i} of {source!r} has image shape {example['image'].shape}, expected "
              f"{shape}: set `data_config.image_size`.")
        out["image"][j], out["label"][j] = example["image"], example["label"]
      yield out

  return n, batches()
