"""Data: grain pipelines over the bundled digits, prepared tfds datasets and local image folders,
on-device augmentations (dm-pix), and a text-only corpus of sentence pairs from the installed packages'
docstrings (`jaxcl.data.sentences`)."""

from jaxcl import _extras

_extras.require_train_extra("jaxcl.data")  # before the imports below, which need it

from jaxcl.data.augment import augment_batch, augment_examples, default_aug_config, example_keys, make_views
from jaxcl.data.digits import CAPTION_TEMPLATES, CLASS_NAMES, Digits, captions_for_labels
from jaxcl.data.pipeline import (
    iterator_checkpoint_args,
    make_train_loader,
    restore_iterator_state,
    save_iterator_state,
)
from jaxcl.data.sources import build_source, default_data_config, load_arrays

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASS_NAMES",
    "Digits",
    "augment_batch",
    "augment_examples",
    "build_source",
    "captions_for_labels",
    "default_aug_config",
    "default_data_config",
    "example_keys",
    "iterator_checkpoint_args",
    "load_arrays",
    "make_train_loader",
    "make_views",
    "restore_iterator_state",
    "save_iterator_state",
]
