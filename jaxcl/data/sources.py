"""Random-access image sources for grain: the bundled digits, prepared tfds datasets, local folders.

`build_source(data_config, split)` returns `(source, info)`. The source has `len()` and
`source[i] -> dict` with

    image    (H, W, C) float32 in [0, 1]
    label    int32 (-1 when the data has no labels)
    index    int32, a stable example id (the dataset's own id where it has one, else the position)
    caption  str, only when the data has captions

and is picklable (grain worker processes) with a `repr` that is stable across runs (grain stores it in
iterator checkpoints). `info` is a `SourceInfo` (`jaxcl.data.source_info`): what the rest of jaxcl
learns about the split (its size, image shape, classes, captions and caption templates, and the range
of its example ids).

`data_config` is an `ml_collections.ConfigDict` (or a dict) with keys
    name           "digits" | "tfds" | "folder" | "docstrings" (text only: `jaxcl.data.sentences`)
    data_dir       where tfds data is prepared / read ("digits": default "~/.cache/jaxcl/tfds")
    tfds_name      "tfds": a dataset name as `tfds.data_source` takes it ("mnist", "my_ds:1.0.0")
    folder         "folder": the image folder
    captions_file  "folder": optional TSV/CSV of filename,caption
    image_size     resize to image_size x image_size (0 keeps the native size; `jaxcl.data.images`)
and, optionally, image_key / label_key / caption_key (the tfds feature names; "image", "label", none).

One module per backend: "digits" and "tfds" are `jaxcl.data.tfds_source` (what tfds formats work
without TensorFlow), "folder" is `jaxcl.data.folder_source` (its layout, captions files and checks), "docstrings" is
`jaxcl.data.sentences` (sentence pairs harvested from the installed packages' docstrings; no image).
Every path (data_dir, folder, captions_file) is a local path or a URI `etils.epath` opens
(`gs://bucket/images`, `jaxcl._paths`). This module picks the backend and reads any source whole
(`load_arrays`), a batch at a time (`split_batches`), or its captions alone (`read_captions`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcl import _checks
from jaxcl.data import folder_source
from jaxcl.data import sentences
from jaxcl.data import tfds_source
from jaxcl.data.source_info import GENERIC_CAPTION_TEMPLATES, SourceInfo, config_image_size, config_value
from jaxcl.data.tfds_source import DIGITS_DATA_DIR

__all__ = [
    "DECLARED_KEYS", "DIGITS_DATA_DIR", "GENERIC_CAPTION_TEMPLATES", "SOURCE_NAMES", "SourceInfo",
    "abstract_info", "build_source", "config_value", "default_data_config", "load_arrays",
    "read_captions", "split_batches",
]

SOURCE_NAMES = ("digits", "tfds", "folder", sentences.SOURCE_NAME)


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
    source, info = folder_source.build(data_config, split)
  elif name == sentences.SOURCE_NAME:
    source, info = sentences.build(data_config, split)
  else:
    source, info = tfds_source.build(data_config, split, digits_data=name == "digits")
  _check_declared(data_config, info)
  return source, info


# What a recipe may declare about its data (`abstract_info`), and the info key each one must match.
DECLARED_KEYS = {"num_classes": "num_classes", "channels": "image_shape"}


def _check_declared(data_config: Any, info: SourceInfo) -> None:
  """A declared `data_config.num_classes` / `channels` (what the planner compiled with) equals the data's."""
  for key, field in DECLARED_KEYS.items():
    declared = config_value(data_config, key, 0)
    if not declared:
      continue
    actual = getattr(info, field)[-1] if field == "image_shape" else getattr(info, field)
    if int(declared) != int(actual):
      raise ValueError(f"`data_config.{key}` is {declared} but the data has {actual}: fix the recipe "
                       f"(or drop the key).")


def abstract_info(data_config: Any, split: str) -> SourceInfo:
  """The `SourceInfo` of `build_source(data_config, split)` from the config alone, no data read (for
  compiling a run before the data is at hand, `jaxcl.plan`).

      image_shape  = (image_size, image_size, channels)     channels: `data_config.channels` or 3
      num_classes  = `data_config.num_classes` (0: none)    class_names = ("class0", …), placeholders
      num_examples = `data_config.num_examples` (0: unknown; only per-example loss state needs it)

  The bundled digits and the docstring pairs are read (they are small and always available). A tfds or folder source needs
  `image_size` > 0 (its native size is only known from the data). The placeholder class names give
  an image–text recipe a vocabulary of about the right size (one word per class); the data's own
  captions are not read (`from_data` is False), so their words are not in a planned vocabulary.

  >>> info = abstract_info({"name": "tfds", "image_size": 224, "num_classes": 2}, "train")
  >>> info.image_shape, info.class_names
  ((224, 224, 3), ('class0', 'class1'))
  """
  name = config_value(data_config, "name", None)
  _checks.check_choice("data_config.name", name, SOURCE_NAMES)
  if name in ("digits", sentences.SOURCE_NAME):
    return build_source(data_config, split)[1]
  size = config_image_size(data_config)
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
      caption_templates=GENERIC_CAPTION_TEMPLATES, num_ids=values["num_examples"], from_data=False)


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
  image (b, H, W, C) float32, label (b,) int32, index (b,) int32 (the example ids), row (b,) int32 (the
  row in the split, N − 1 past the end) and valid (b,) bool (False past the end); label and index are
  0 past the end. Only one batch is in memory at a time.

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
             "index": np.zeros((b,), np.int32), "row": np.minimum(rows, n - 1).astype(np.int32),
             "valid": rows < n}
      for j, i in enumerate(rows[rows < n]):
        example = source[int(i)]
        if example["image"].shape != shape:
          raise ValueError(
              f"example {i} of {source!r} has image shape {example['image'].shape}, expected "
              f"{shape}: set `data_config.image_size`.")
        out["image"][j], out["label"][j], out["index"][j] = example["image"], example["label"], example["index"]
      yield out

  return n, batches()


def read_captions(data_config: Any, split: str) -> tuple[str, ...]:
  """The data's own captions of `split`, in the source's order, read without decoding any image: a
  folder's captions file, a tfds dataset's `caption_key` feature; () when the data has none of its own
  (no captions, or captions made from the labels: the digits).

  >>> read_captions({"name": "tfds", "tfds_name": "mnist"}, "train")  # no caption_key: nothing read
  ()
  """
  name = config_value(data_config, "name", None)
  _checks.check_choice("data_config.name", name, SOURCE_NAMES)
  if name == "folder":
    return folder_source.read_captions(data_config, split)
  if name == "tfds":
    return tfds_source.read_captions(data_config, split)
  return ()
