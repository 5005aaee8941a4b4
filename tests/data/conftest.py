"""Fixtures of the data tests: the digits written as ArrayRecord once per session (per xdist worker),
and scikit-learn's own digits arrays (the reference)."""

import pytest
from sklearn import datasets as sk_datasets

from jaxcl.data import tfds_source


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  return tfds_source.prepare_digits(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def sk_digits():
  bunch = sk_datasets.load_digits()
  return bunch.images, bunch.target
