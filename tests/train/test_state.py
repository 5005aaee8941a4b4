"""jaxcl.train.state: the size of the per-example state (iSogCLR's τ_i and u_i) over the example ids, and
the initial parameters a method starts from."""

import dataclasses

import jax
import numpy as np

from jaxcl.data import digits, sources
from jaxcl.train import state as state_lib
from jaxcl.train.methods import sentence
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


def test_init_state_starts_from_the_methods_initial_params():
  """`init_state`'s parameters are `Method.initial_params` of the model's random init (SimCSE's
  pretrained MiniLM; here a method that adds 1 to a tiny BERT's init)."""
  class Shifted(sentence.SimCSE):
    def initial_params(self, config, text_side, params):
      return jax.tree.map(lambda p: p + 1.0, params)

  config = load_recipe("simcse_minilm")
  config.sentence.encoder = "bert"
  config.model.text_width, config.model.text_depth, config.model.text_heads = 16, 1, 2
  setup = state_lib.build_setup(config)
  key = jax.random.key(3)

  @jax.jit
  def both(key):
    init = setup.model.init({"params": key}, *state_lib.sample_inputs(config, setup, 2), train=False)["params"]
    return init, state_lib.init_state(config, setup.replace(method=Shifted()), key).params

  init, params = both(key)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a) + np.float32(1.0), b), init, params)
