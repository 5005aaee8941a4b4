"""jaxcl.train.validation: bad configs, data folders and captions files are errors that name the key,
before any compute and before the workdir is created."""

from __future__ import annotations

import jax
import ml_collections
import pytest

from jaxcl.train import loop
from tests.helpers import load_recipe, tiny, tiny_config, write_images


def test_bad_config_fails_before_compute(data_dir, tmp_path):
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.batch_size = 12  # not a multiple of the 8 test devices
  with pytest.raises(ValueError, match=r"`config.batch_size` must be a positive multiple of the device count 8"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.method = "simclr++"
  with pytest.raises(ValueError, match=r"`config.method` must be one of"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config = tiny(load_recipe("simclr_digits"), data_dir)
  config.model.encoder, config.model.remat = "mlp", True
  with pytest.raises(ValueError, match=r"`config.model.remat` = True needs an encoder made of blocks .*'mlp'"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)


def expect_error(config, workdir, match):
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(config, str(workdir), progress=False)
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_unknown_keys_and_wrong_types_are_errors(data_dir, no_compute, tmp_path):
  config = tiny_config(data_dir)
  config.unlock()
  config.batchsize = 64  # a typo in a recipe file (an unlocked ConfigDict accepts new keys)
  expect_error(config, tmp_path, r"Unknown config key `config.batchsize` \(did you mean `config.batch_size`\?\)")
  config = tiny_config(data_dir)
  config.unlock()
  config.model.projection_dim = 64
  expect_error(config, tmp_path, r"Unknown config key `config.model.projection_dim`")
  for key, value, message in [
      ("batch_size", "64", r"`config.batch_size` must be int \(like the default 256\), got '64' of type str"),
      ("learning_rate", "0.1", r"`config.learning_rate` must be float .* got '0.1' of type str"),
      ("eval.linear_probe", 1, r"`config.eval.linear_probe` must be bool"),
      ("model.projection_dims", 32, r"`config.model.projection_dims` must be a tuple of ints"),
  ]:
    plain = tiny_config(data_dir).to_dict()  # configs built by hand escape ConfigDict's type checks
    section = plain
    *path, last = key.split(".")
    for part in path:
      section = section[part]
    section[last] = value
    expect_error(ml_collections.ConfigDict(plain), tmp_path, message)
  plain = tiny_config(data_dir).to_dict()
  del plain["eval"]["knn_k"]
  expect_error(ml_collections.ConfigDict(plain), tmp_path, r"The config lacks the keys \['config.eval.knn_k'\]")
  config = tiny_config(data_dir)
  with pytest.raises(TypeError, match="batch_size"):  # and on a ConfigDict, at assignment
    config.batch_size = "64"
  for key, value, message in [("on_nonfinite", "ignore", r"`config.on_nonfinite` must be one of \('stop', 'skip'\)"),
                              ("learning_rate", -1.0, r"`config.learning_rate` must be a finite number >= 0"),
                              ("keep_checkpoints", 0, r"`config.keep_checkpoints` must be a positive integer"),
                              ("data__name", "imagenet", r"`config.data.name` must be one of")]:
    expect_error(tiny_config(data_dir, **{key: value}), tmp_path, message)


def test_batch_size_not_divisible_by_the_devices(data_dir, no_compute, tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  expect_error(tiny_config(data_dir, batch_size=20), tmp_path,
               r"`config.batch_size` must be a positive multiple of the device count 8, got 20")


def test_loss_name_logit_scale_and_encoder_are_checked_before_any_folder(data_dir, no_compute, tmp_path):
  workdir = tmp_path / "run"
  for changes, message in [
      ({"loss__name": "ntxent"}, r"`config.loss.name` for method 'simclr' must be one of \('nt_xent', 'dcl', "
                                 r"'dclw', 'macl', 'hn_nce', 'positive_aware_infonce', 'isogclr', "
                                 r"'mcl_nt_xent'\), got 'ntxent'"),
      ({"method": "multiview", "num_views": 3, "loss__name": "nt_xent"},
       r"`config.loss.name` for method 'multiview' must be one of \('multiview_infonce', 'mv_dhel', "
       r"'pairwise_nt_xent'\), got 'nt_xent'"),
      ({"method": "clip", "loss__name": "clip", "loss__logit_scale_init": 0.0},
       r"`config.loss.logit_scale_init` must be a finite number > 0 \(the model learns its logarithm\), got 0.0"),
      ({"method": "clip", "loss__name": "siglip", "loss__logit_scale_init": -10.0},
       r"`config.loss.logit_scale_init` must be a finite number > 0 .*got -10.0"),
      ({"model__encoder": "resnet19"}, r"`config.model.encoder` must be one of \('resnet18', .*'mlp'\) \(an "
                                       r"image encoder of jaxcl.models.build_model\), got 'resnet19'"),
      ({"model__encoder": "text_transformer"}, r"`config.model.encoder` must be one of .*got 'text_transformer'"),
      ({"momentum__queue_size": 1024}, r"`config.momentum.queue_size` = 1024 is a setting of the methods "
                                       r"\('moco', 'byol'\), not of 'simclr': leave it at 0"),
      ({"method": "supcon", "loss__name": "supcon", "mcl__num_clusters": 4},
       r"`config.mcl.num_clusters` = 4 is a setting of the methods \('simclr',\), not of 'supcon'"),
  ]:
    with pytest.raises(ValueError, match=message):
      loop.train_and_evaluate(tiny_config(data_dir, **changes), str(workdir), progress=False)
    assert not workdir.exists()  # checked before the workdir was created


def folder_config(data_dir, folder, **changes):
  return tiny_config(data_dir, data__name="folder", data__folder=str(folder), **changes)


def test_bad_image_folders_are_errors_before_compute(data_dir, no_compute, tmp_path):
  workdir = tmp_path / "work"
  expect_error(folder_config(data_dir, tmp_path / "missing"), workdir, r"`data_config.folder` .* is not a directory")
  empty = tmp_path / "empty"
  empty.mkdir()
  expect_error(folder_config(data_dir, empty), workdir, r"Image folder .*empty' contains no images")
  (empty / "notes.txt").write_text("not an image")
  expect_error(folder_config(data_dir, empty), workdir, r"contains no images")

  broken = tmp_path / "broken"
  write_images(broken, [f"a/{i}.png" for i in range(3)] + [f"b/{i}.png" for i in range(3)])
  (broken / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
  expect_error(folder_config(data_dir, broken), workdir, r"Unreadable image .*9.png")
  good = (broken / "a" / "0.png").read_bytes()
  (broken / "b" / "9.png").write_bytes(good[: len(good) // 2])  # a truncated file
  expect_error(folder_config(data_dir, broken), workdir, r"Unreadable image .*9.png")

  # the evaluation split is checked up front too, not after training
  split = tmp_path / "split"
  write_images(split, [f"train/a/{i}.png" for i in range(4)] + [f"train/b/{i}.png" for i in range(4)])
  (split / "test").mkdir()
  expect_error(folder_config(data_dir, split), workdir, r"Image folder .*test' contains no images")


def test_captions_file_with_missing_entries_is_an_error_before_compute(data_dir, no_compute, tmp_path):
  folder = tmp_path / "images"
  names = [f"{i}.png" for i in range(6)]
  write_images(folder, names)
  (folder / "captions.tsv").write_text("".join(f"{n}\ta photo number {i}\n" for i, n in enumerate(names[:4])))
  config = folder_config(data_dir, folder, data__captions_file="captions.tsv", method="clip",
                         loss__name="clip")
  expect_error(config, tmp_path / "work", r"Captions file .*captions.tsv' has no caption for 2 of 6 images .*'4.png', '5.png'")
  (folder / "captions.tsv").write_text("0.png\ta photo\n1.png\t\n")
  expect_error(config, tmp_path / "work", r"line 2: empty caption for '1.png'")
  config.data.captions_file = "nope.tsv"
  expect_error(config, tmp_path / "work", r"`data_config.captions_file` .*nope.tsv' does not exist")
  # image-text training needs captions or class folders to make them from
  config.data.captions_file = ""
  expect_error(config, tmp_path / "work", r"method 'clip' trains on image-caption pairs, but .* neither captions")
