"""jaxcl.train.state: the size of the per-example state (iSogCLR's τ_i and u_i) over the example ids."""

import dataclasses

import jax

from jaxcl.data import digits, sources
from jaxcl.train import state as state_lib
from tests.helpers import load_recipe


def test_per_example_state_size_covers_every_id_and_shards_evenly(data_dir):
  config = load_recipe("isogclr_digits")
  config.data.data_dir = data_dir
  n = jax.device_count()
  assert n == 8  # tests/conftest.py
  # digits ids are positions in load_digits() (1797, both splits), padded to 1800 = 225 x 8.
  _, info = sources.build_source(config.data, "train")
  assert info.num_examples == 1438 and info.num_ids == digits.NUM_EXAMPLES
  assert state_lib.per_example_state_size(info) == 1800
  info = dataclasses.replace(info, num_examples=17, num_ids=17)  # ids are positions in the split
  assert state_lib.per_example_state_size(info) == 24
  assert state_lib.per_example_state_size(dataclasses.replace(info, num_ids=40)) == 40
