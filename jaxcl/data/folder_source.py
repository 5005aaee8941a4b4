"""The image-folder backend of `jaxcl.data.sources` (data config name "folder"): a local folder or a
URI of images, with class subfolders and an optional captions file.

`folder/<split>/` is used when it exists (e.g. folder/train, folder/test), else `folder` itself serves
every split. Inside it, class subfolders give labels (sorted names, ImageFolder style); images directly
in it get label -1. Images are decoded with Pillow: grayscale when every image is 8/16-bit grayscale,
else RGB (alpha dropped). Every image is decoded once by `build`, so an unreadable file is an error
before any compute, as are an empty folder, mixed sizes with image_size 0, and a captions file that
misses an image.

Every path (folder, captions_file) is a local path or a URI `etils.epath` opens (`gs://bucket/images`,
`jaxcl._paths`): folders are listed and images and captions read through epath.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from jaxcl import _paths
from jaxcl.data import images
from jaxcl.data.source_info import GENERIC_CAPTION_TEMPLATES, SourceInfo, config_image_size, config_value

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
SPLIT_FOLDERS = ("train", "test", "validation", "val")


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
        image = images.pil_to_float(im, self.channels)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"Cannot read image {path!r}: {type(e).__name__}: {e}") from e
    return images.resize_square(image, self.image_size)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self.files):
      raise IndexError(f"index {i} out of range for {self!r}.")
    out = {"image": self.load_image(i), "label": self.labels[i], "index": np.int32(i)}
    if self.captions is not None:
      out["caption"] = self.captions[i]
    return out


def data_path(path: str | os.PathLike[str]) -> epath.Path:
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
  path = data_path(path)
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


def _list_split(config: Any, split: str):
  """(folder, split root, image paths, labels, class names) of `split`, listed but not decoded."""
  folder_name = config_value(config, "folder", "")
  if not folder_name:
    raise ValueError("`data_config.folder` must name a folder of images, got ''.")
  folder = data_path(folder_name)
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
  return folder, root, paths, labels, class_names


def _captions_of(config: Any, folder: epath.Path, root: epath.Path, paths) -> list[str] | None:
  """The caption of each of `paths` from `data_config.captions_file` (None without one); the file's
  rows may name an image relative to the split root, to the folder, or by its file name."""
  captions_file = config_value(config, "captions_file", "")
  if not captions_file:
    return None
  captions_path = data_path(captions_file)
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
  return captions


def build(config: Any, split: str) -> tuple[FolderSource, SourceInfo]:
  """(source, info) of `split` of `data_config.folder`: every image decoded once to check it and find
  the channels (and the size when image_size is 0), every image given its caption when there is a
  captions file."""
  folder, root, paths, labels, class_names = _list_split(config, split)
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    probes = list(pool.map(_probe_image, paths))
  channels = 1 if all(mode in images.GRAY_MODES for _, mode in probes) else 3
  image_size = config_image_size(config)
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

  captions = _captions_of(config, folder, root, paths)
  source = FolderSource(
      str(root), [p.relative_to(root).as_posix() for p in paths], labels, captions=captions,
      image_size=image_size, channels=channels,
  )
  info = SourceInfo(
      num_examples=len(source), image_shape=tuple(image_shape), num_classes=len(class_names),
      class_names=tuple(class_names), has_captions=captions is not None, captions_from_labels=False,
      caption_templates=GENERIC_CAPTION_TEMPLATES, num_ids=len(source))
  return source, info


def read_captions(config: Any, split: str) -> tuple[str, ...]:
  """The captions of `split` in the source's order (from `data_config.captions_file`), the images
  listed but not decoded; () without a captions file."""
  folder, root, paths, _, _ = _list_split(config, split)
  return tuple(_captions_of(config, folder, root, paths) or ())
