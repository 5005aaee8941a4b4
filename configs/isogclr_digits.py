"""SimCLR with the iSogCLR loss on the digits: a learned temperature per example.

"Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic Temperature
Individualization" (Qiu et al., ICML 2023): the SimCLR views, encoder and projection, trained with a
DRO-robust global contrastive loss whose per-example temperatures τ_i and moving-average normalisers u_i
live in `TrainState.method_state`, indexed by the stable example id `batch["index"]` (sharded along the
batch mesh axes, checkpointed with the rest of the state). `config.loss.temperature` is not used:
`config.isogclr.*` set τ₀, γ, ρ, η, β and the τ range (defaults of the authors' LibAUC code).
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "simclr"
  c.loss.name = "isogclr"
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
