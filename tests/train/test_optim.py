"""jaxcl.train.optim: the learning-rate schedule."""

import numpy as np

from tests.helpers import load_recipe


def test_learning_rate_schedule_counts_optimizer_updates():
  from jaxcl.train import optim

  config = load_recipe("simclr_digits")
  config.total_steps, config.warmup_steps, config.learning_rate = 100, 10, 1.0
  plain = [float(optim.learning_rate_at(config, s)) for s in (5, 10, 99)]
  config.grad_accum_steps = 2  # 50 optimizer updates: warmup 5 updates, decay to ~0 by step 99
  accum = [float(optim.learning_rate_at(config, s)) for s in (5, 10, 99)]
  np.testing.assert_allclose(plain[:2], [0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(accum[:2], [0.4, 1.0], rtol=1e-6)  # update 2 of a 5-update warmup
  assert accum[2] < 0.01 and plain[2] < 0.01
