"""The text side of image-text methods (`jaxcl.train.text`): captions made from labels with the data's own
templates, which are also the zero-shot prompts and the trained tower's vocabulary."""

import numpy as np

from jaxcl import models
from jaxcl.data import digits, sources
from jaxcl.train import text as text_lib
from jaxcl.train.config import base_config
from tests.helpers import write_images


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


def test_hard_negative_captions_swap_the_class_name_per_seed_step_and_example():
  names = digits.CLASS_NAMES
  captions, labels, ids = ["the digit three.", "a scan of a handwritten one.", "no class here"], [3, 1, 2], [7, 4, 9]
  texts, valid = text_lib.hard_negative_captions(captions, labels, ids, names, 4, seed=0, step=5)
  assert valid.tolist() == [[True] * 4, [True] * 4, [False] * 4] and texts[2] == ["no class here"] * 4
  for caption, label, negatives in zip(captions[:2], labels, texts[:2]):
    # Only the class name changes: 4 distinct other classes, the rest of the caption kept.
    classes = {next(c for c in names if n == caption.replace(names[label], c)) for n in negatives}
    assert len(classes) == 4 and names[label] not in classes
  # Deterministic per (seed, step, example id), not per position in the batch; another step draws anew.
  again, _ = text_lib.hard_negative_captions(captions[::-1], labels[::-1], ids[::-1], names, 4, seed=0, step=5)
  assert again[::-1] == texts
  draws = {tuple(text_lib.hard_negative_captions(captions[:1], [3], [7], names, 4, seed=0, step=s)[0][0])
           for s in range(20)}
  assert len(draws) > 1


def test_the_digits_keep_their_own_templates(data_dir):
  config = base_config()
  config.data.data_dir = data_dir
  _, info = sources.build_source(config.data, "train")
  assert info.caption_templates == digits.CAPTION_TEMPLATES and info.captions_from_labels and info.has_captions
  assert text_lib.TokenText(config, info).templates == digits.CAPTION_TEMPLATES


def test_the_words_of_a_folders_own_captions_are_in_the_vocabulary(tmp_path):
  names = ["cat/a.png", "cat/b.png", "dog/c.png"]
  write_images(tmp_path / "pets", names)
  captions = ["a tabby sleeping on the sofa", "zebra-striped kitten, sleeping", "a puppy chasing a tabby ball"]
  (tmp_path / "captions.tsv").write_text("".join(f"{n}\t{c}\n" for n, c in zip(names, captions)))
  config = base_config()
  config.method, config.loss.name = "clip", "clip"
  config.data.name, config.data.folder = "folder", str(tmp_path / "pets")
  _, plain_info = sources.build_source(config.data, "train")
  plain = text_lib.TokenText(config, plain_info)  # no captions file: the templates × class names only
  config.data.captions_file = str(tmp_path / "captions.tsv")
  _, info = sources.build_source(config.data, "train")
  side = text_lib.TokenText(config, info)
  unk = models.SimpleTokenizer.UNK
  assert unk in plain.tokens(["a tabby sleeping"])  # what the templates alone made of these captions
  # Every word of every caption has an id of its own; the templates' words keep theirs.
  # ("a", "the" are template words; "sleeping", "tabby" appear twice, the others once, ties sorted)
  new_words = ["sleeping", "tabby", ",", "-", "ball", "chasing", "kitten", "on", "puppy", "sofa", "striped", "zebra"]
  assert side.tokenizer.vocab == plain.tokenizer.vocab + new_words
  tokens = side.tokens(captions)
  assert unk not in tokens and side.vocab_size == plain.vocab_size + len(new_words)
  assert side.tokenizer.decode(tokens) == ["a tabby sleeping on the sofa", "zebra - striped kitten , sleeping",
                                           "a puppy chasing a tabby ball"]
  for template in info.caption_templates:
    np.testing.assert_array_equal(side.tokens([template.format("dog")]), plain.tokens([template.format("dog")]))
  assert unk in side.tokens(["a giraffe"])  # a word the run never sees
  # capped: the most frequent caption words only
  limited = text_lib.caption_vocabulary(info, sources.read_captions(config.data, "train"), limit=2)
  assert limited.vocab == plain.tokenizer.vocab + ["sleeping", "tabby"]


def test_a_planned_run_reads_no_captions(tmp_path):
  # The plan's info comes from the config alone (`abstract_info`): a caption_key names captions that are
  # not at hand, so the vocabulary is the templates × the placeholder class names.
  config = base_config()
  config.method, config.loss.name = "clip", "clip"
  config.data.update(dict(name="tfds", tfds_name="jaxcl_no_such_dataset", data_dir=str(tmp_path), image_size=8))
  with config.unlocked():
    config.data.caption_key, config.data.num_classes = "caption", 2
  info = sources.abstract_info(config.data, "train")
  assert info.has_captions and not info.from_data
  side = text_lib.TokenText(config, info)
  assert side.tokenizer.vocab == text_lib.caption_vocabulary(info).vocab
  assert "class1" in side.tokenizer.vocab
  # ... but the text tower it plans is sized for the most caption words a run may add (an upper bound)
  assert side.vocab_size == side.tokenizer.vocab_size + text_lib.CAPTION_WORDS_LIMIT
