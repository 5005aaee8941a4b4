"""Tests of jaxcl/losses/accuracy.py."""

import numpy as np
import pytest

from jaxcl import losses
from tests.helpers import randn


def test_retrieval_accuracy_matches_numpy_argmax():
  a = randn(95, 30, 5)
  b = a + randn(96, 30, 5)
  valid = np.random.default_rng(97).random(30) < 0.6
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s = norm(a.astype(np.float64)) @ norm(b.astype(np.float64)).T
  for mask in (None, valid):
    keep = np.ones(30, bool) if mask is None else mask
    sub = s[np.ix_(keep, keep)]
    want = [np.mean(np.argmax(sub, 1) == np.arange(len(sub))), np.mean(np.argmax(sub, 0) == np.arange(len(sub)))]
    got = losses.retrieval_accuracy(a, b, mask=mask)
    np.testing.assert_allclose([float(got.a_to_b), float(got.b_to_a)], want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"`mask` must have shape \(30,\)"):
    losses.retrieval_accuracy(a, b, mask=np.ones(3, bool))
