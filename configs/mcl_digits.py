"""A later stage of Multistage Contrastive Learning on the digits (stage 1 is `simclr_digits`).

"Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning" (Zhang et al., ECCV
2024). Every stage is the SimCLR recipe; stage t > 1 restricts each anchor's negatives to its cluster in
the k-means clusterings of the earlier stages' features, so it learns what they suppressed, and is
evaluated on the concatenation of all stages' features (jaxcl/train/mcl.py). An earlier stage must have
finished (its results.json is of its newest checkpoint):

    python -m jaxcl.main --config=configs/simclr_digits.py --workdir=runs/mcl1
    python -m jaxcl.main --config=configs/mcl_digits.py --workdir=runs/mcl2 \\
        --config.mcl.previous_stages=runs/mcl1
    python -m jaxcl.main --config=configs/mcl_digits.py --workdir=runs/mcl3 \\
        --config.mcl.previous_stages=runs/mcl1,runs/mcl2

experiments/mcl_stages.py runs the stages and compares them with independently seeded SimCLR runs.
"""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()  # the settings of simclr_digits, with the MCL loss
  c.method = "simclr"
  c.loss.name = "mcl_nt_xent"
  c.loss.temperature = 0.2
  c.mcl.num_clusters = 10
  c.batch_size = 256
  c.total_steps = 400
  c.learning_rate = 1.0
  c.warmup_steps = 30
  c.checkpoint_every = 200
  c.eval_every = 200
  c.log_every = 20
  return c
