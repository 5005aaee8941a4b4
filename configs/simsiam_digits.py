"""SimSiam on the digits: "Exploring Simple Siamese Representation Learning" (Chen & He, 2021):
predictor + stop-gradient, negative cosine, no target network and no negatives."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "simsiam"
  c.loss.name = "negative_cosine"
  c.model.predictor_dim = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.weight_decay = 1e-4
  c.total_steps = 600
  c.warmup_steps = 30
  c.eval_every = 300
  c.log_every = 20
  return c
