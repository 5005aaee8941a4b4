"""The handwritten digits that scikit-learn ships, as a tfds dataset: real images with no download.

`Digits` is a `tfds.core.GeneratorBasedBuilder` (registered as "jaxcl_digits", version 1.0.0) that
reads `sklearn.datasets.load_digits()` (1,797 8x8 grayscale images, pixel values 0..16, 10 classes;
"Optical Recognition of Handwritten Digits", Alpaydin & Kaynak, UCI, 1998) and writes it as ArrayRecord,
so it is read back with `tfds.data_source` + grain without TensorFlow. Features:

    image  (8, 8, 1) uint8   round(v · 255 / 16) of the 0..16 pixel value v
    label  int64 ClassLabel  CLASS_NAMES ("zero" .. "nine")
    index  int64             position of the example in `load_digits()` (a stable example id)

Splits: "train" and "test", a fixed stratified split: within each class the examples are permuted by
`np.random.default_rng(SPLIT_SEED)` and the first round(TEST_FRACTION · n_class) go to "test".

`CAPTION_TEMPLATES` and `captions_for_labels` turn labels into short texts for CLIP-style training and
zero-shot evaluation on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

NAME = "jaxcl_digits"
VERSION = "1.0.0"
NUM_EXAMPLES = 1797
IMAGE_SHAPE = (8, 8, 1)
TEST_FRACTION = 0.2
SPLIT_SEED = 0

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{}" is replaced by the class name. In the spirit of the CLIP prompt ensembles ("Learning Transferable
# Visual Models From Natural Language Supervision", Radford et al., 2021).
CAPTION_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the digit {}.",
    "a scan of a handwritten {}.",
    "a low resolution image of the number {}.",
    "a pixelated drawing of a {}.",
    "the number {}, written by hand.",
    "a blurry picture of the digit {}.",
)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images (1797, 8, 8, 1) uint8 in 0..255, labels (1797,) int64) from scikit-learn, no download.

  >>> images, labels = load_sklearn_digits()
  >>> images.shape, images.dtype, int(images.max()), labels[:3].tolist()
  ((1797, 8, 8, 1), dtype('uint8'), 255, [0, 1, 2])
  """
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
    raise ImportError(
        "The 'digits' dataset reads `sklearn.datasets.load_digits`: `pip install scikit-learn`."
    ) from e
  bunch = datasets.load_digits()
  images = np.round(np.asarray(bunch.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], np.asarray(bunch.target, np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
  """{"train": indices, "test": indices}: per class, a seeded permutation, the first part to "test".

  Each class c with n_c examples puts round(test_fraction · n_c) of them in "test"; both index arrays
  are sorted. Uses only `np.random.default_rng(seed)` (PCG64), so it is stable across library versions.

  >>> s = stratified_split(np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]), test_fraction=0.4)
  >>> len(s["train"]), len(s["test"]), sorted(np.r_[s["train"], s["test"]]) == list(range(10))
  (6, 4, True)
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"`labels` must have rank 1, got shape {labels.shape}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(members)))
    test.append(members[:n_test])
    train.append(members[n_test:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def captions_for_labels(
    labels: Sequence[int] | np.ndarray,
    rng: np.random.Generator | int | None,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    class_names: Sequence[str] = CLASS_NAMES,
) -> list[str]:
  """One caption per label, `templates[t].format(class_names[label])` with t drawn uniformly from `rng`.

  Deterministic given `rng` (a `np.random.Generator`, or an int seed; None draws from fresh entropy).

  >>> captions_for_labels([3, 0], rng=0, templates=("the digit {}.",))
  ['the digit three.', 'the digit zero.']
  >>> captions_for_labels([7], rng=1) == captions_for_labels([7], rng=1)
  True
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"`labels` must have rank 1, got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"`labels` must have an integer dtype, got {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(
        f"`labels` must be in [0, {len(class_names) - 1}], got values in "
        f"[{labels.min()}, {labels.max()}]."
    )
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(
        f"`templates` must be a non-empty list of strings with '{{}}', got {templates!r}."
    )
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  choice = rng.integers(0, len(templates), size=labels.shape[0])
  return [templates[t].format(class_names[y]) for t, y in zip(choice, labels.tolist())]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits with a fixed stratified train/test split (no download).

  >>> import tempfile
  >>> tmp = tempfile.TemporaryDirectory()
  >>> builder = Digits(data_dir=tmp.name, file_format="array_record")
  >>> builder.name, str(builder.version), builder.info.features["label"].num_classes
  ('jaxcl_digits', '1.0.0', 10)
  >>> tmp.cleanup()
  """

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "scikit-learn digits, stratified 80/20 split with seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "The 1,797 8x8 handwritten digits of scikit-learn (pixel values 0..16 rescaled to "
            "0..255) with a stratified 80/20 train/test split."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        citation=(
            "@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, title={Optical "
            "Recognition of Handwritten Digits}, year={1998}, howpublished={UCI Machine Learning "
            "Repository}}"
        ),
    )

  def _split_generators(self, dl_manager: Any):
    del dl_manager  # The data comes from scikit-learn: nothing to download.
    images, labels = load_sklearn_digits()
    if len(labels) != NUM_EXAMPLES:
      raise ValueError(
          f"scikit-learn's digits must have {NUM_EXAMPLES} examples, got {len(labels)}."
      )
    splits = stratified_split(labels)
    return {
        split: self._generate_examples(images, labels, indices) for split, indices in splits.items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for i in indices.tolist():
      yield i, {"image": images[i], "label": int(labels[i]), "index": i}
