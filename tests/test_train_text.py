"""The text side of image-text methods (`jaxcl.train.text`): captions made from labels with the data's own
templates, which are also the zero-shot prompts and the trained tower's vocabulary."""

import numpy as np

from jaxcl.data import digits, sources
from jaxcl.train import text as text_lib
from jaxcl.train.config import base_config
from tests.test_reliability import write_images
from tests.test_train import data_dir  # noqa: F401  (fixture)


def test_a_labelled_folder_gets_photo_captions_not_the_digits(tmp_path):
  write_images(tmp_path / "pets", ["cat/a.png", "cat/b.png", "dog/c.png"])
  config = base_config()
  config.method, config.loss.name = "clip", "clip"
  config.data.name, config.data.folder = "folder", str(tmp_path / "pets")
  _, info = sources.build_source(config.data, "train")
  assert info.class_names == ("cat", "dog") and not info.has_captions and not info.captions_from_labels
  assert info.caption_templates == sources.GENERIC_CAPTION_TEMPLATES
  side = text_lib.TokenText(config, info)
  assert side.templates == sources.GENERIC_CAPTION_TEMPLATES  # the zero-shot prompts
  host = {"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.array([0, 1, 1, 0], np.int32),
          "index": np.arange(4, dtype=np.int32)}
  captions = side.tokenizer.decode(side.prepare(config, host, step=0)["text"])  # word tokens: "cat ."
  for caption, label in zip(captions, host["label"]):
    made = {side.tokenizer.decode(side.tokens([t.format(info.class_names[label])]))[0] for t in info.caption_templates}
    assert caption in made and "digit" not in caption, (caption, made)

def test_the_digits_keep_their_own_templates(data_dir):  # noqa: F811
  config = base_config()
  config.data.data_dir = data_dir
  _, info = sources.build_source(config.data, "train")
  assert info.caption_templates == digits.CAPTION_TEMPLATES and info.captions_from_labels and info.has_captions
  assert text_lib.TokenText(config, info).templates == digits.CAPTION_TEMPLATES
