"""Image-text methods: a `jaxcl.models.DualEncoder` (image tower + text tower, a learnable logit scale
and, for SigLIP, bias) trained on (image, caption) pairs.

- clip / siglip: the text tower is a transformer trained from scratch on token ids (`text.TokenText`);
  `config.loss.name` is "clip" ("Learning Transferable Visual Models From Natural Language
  Supervision", Radford et al., 2021) or "siglip" ("Sigmoid Loss for Language Image Pre-Training",
  Zhai et al., 2023), whichever method is named.
- clip also takes `isogclr_clip`, the image–text form of iSogCLR ("Not All Semantics are Created Equal:
  Contrastive Self-supervised Learning with Automatic Temperature Individualization", Qiu et al.,
  2023; `losses.isogclr_clip`): per-pair temperatures τ_i, τ'_i and moving-average normalisers for the
  images and the texts in `TrainState.method_state`, indexed by the batch's stable example id
  `batch["index"]` and split over the devices along the example axis; the hyper-parameters in
  `config.isogclr_clip` (LibAUC `GCLoss_v2`'s defaults, not simclr's `config.isogclr`). The model's
  learned logit scale is not used by this loss. Under gradient accumulation the state is updated at
  every micro-step.
- clip also takes `ce_clip` ("Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives to Enhance
  Visio-Linguistic Compositional Understanding", Zhang, Awal & Agrawal, 2024; `losses.ce_clip`): H
  hard-negative captions per image, made where the captions are tokenised (`text.hard_negative_captions`:
  the class name swapped for another class's, deterministic per seed, step and example id) and
  embedded by the same text tower in the same call; the adaptive rank thresholds θ (H,) are the method
  state, `{"thresholds": θ}` (replicated, 0 at the start), fed back every step; the weights, H and θ's
  range in `config.ce_clip`. The model's learned logit scale is CE-CLIP's S = scale · cos.
- clip also takes `gram` ("Gramian Multimodal Representation Learning and Alignment", Cicchetti et al.,
  ICLR 2025): the volume contrast `losses.gram` (text the anchor, symmetric cross-entropy over −Vol/τ,
  label smoothing `config.gram.label_smoothing`) plus `config.gram.dam_weight` (the authors' `itm_ratio`)
  times the data–anchor matching (DAM) term `gram_matching_loss`: a matching head (`models.MatchHead`,
  the model's `match_head`, parameters under "match_head", created only when dam_weight > 0) scores the
  true pairs and the hard negatives `losses.gram_negatives` draws by volume. The loss reads the head's
  parameters (`Method.loss_reads_params`). τ is the model's learned logit scale as 1/τ
  (`config.gram.temperature = 0`, the default: learned, as the authors' `contra_temp`, though in log
  space and capped at 1/τ <= 100) or a fixed `config.gram.temperature` > 0. The negatives' key folds
  `config.seed` and a draw counter in (`gram_negatives_key`): the loss has no step, so the method state
  `{"draws": n}` counts the losses applied (a non-finite step keeps the state, and its draw is redrawn;
  under gradient accumulation every micro-step draws). With two modalities (image, caption) the volume
  is |sin θ| of the two unit embeddings (k = 2); the authors' runs have three to five.
- lit ("LiT: Zero-Shot Transfer with Locked-image text Tuning", Zhai et al., 2022, here with the text
  side locked): the text side is the pretrained MiniLM encoder, whose embeddings arrive precomputed
  with the batch (`text.LockedText`); only the image tower and a projection are trained.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import losses
from jaxcl import models
from jaxcl.ops.engines import SHARDED_IMPLS
from jaxcl.train import devices, text
from jaxcl.train.methods import base

LOG_U_FIELDS = ("image_log_u", "text_log_u")  # stored finite: `base.stored_log_u`


def isogclr_clip_section() -> ml_collections.ConfigDict:
  """`config.isogclr_clip`: defaults of the authors' implementation for image–text tasks (LibAUC
  `GCLoss_v2`, enable_isogclr=True; `losses.isogclr_clip`)."""
  c = ml_collections.ConfigDict()
  c.tau_init = 0.01  # τ₀ = τ'₀ of every pair
  c.gamma = 0.9  # moving-average weight of the normalisers u
  c.rho = 6.0  # DRO radius ρ
  c.eta = 0.01  # step size of the temperature updates
  c.beta = 0.9  # momentum of the temperature gradients
  c.tau_min = 0.005
  c.tau_max = 0.05
  return c


def ce_clip_section() -> ml_collections.ConfigDict:
  """`config.ce_clip`: the released CE-CLIP run's loss weights and threshold clamp (lezhang7/
  Enhance-FineGrained: IMC 0.3, CMR 0.2, θ ∈ [0, 10] in logit units) and H = 3 hard negatives per image,
  one threshold θ_h each (the authors' generated negatives swap relations, attributes and objects; here
  each is the caption with another class's name swapped in, `text.hard_negative_captions`)."""
  c = ml_collections.ConfigDict()
  c.imc_weight = 0.3  # intra-modal contrast: the caption against every hard negative
  c.cmr_weight = 0.2  # cross-modal rank: S(I, T) above S(I, N_h) by the adaptive threshold θ_h
  c.num_hard_negatives = 3  # H, at most the number of classes − 1
  c.threshold_min = 0.0  # θ is clipped to [threshold_min, threshold_max] after every update
  c.threshold_max = 10.0
  return c


def gram_section() -> ml_collections.ConfigDict:
  """`config.gram`: the authors' settings (github.com/ispamm/GRAM: label smoothing 0.1 in `model/gram.py`
  `forward_ret`, `itm_ratio` 1.0 in `utils/args.py`); τ learned (their `contra_temp`, initialised at
  0.07: here the model's logit scale, `config.loss.logit_scale_init` = 1/τ₀)."""
  c = ml_collections.ConfigDict()
  c.temperature = 0.0  # τ of the volume logits −Vol/τ; 0: learned, the model's logit scale is 1/τ
  c.label_smoothing = 0.1  # ε of `losses.gram`
  c.dam_weight = 1.0  # weight of the data–anchor matching term (the authors' itm_ratio); 0: the volume contrast alone
  c.head_hidden = 0  # hidden size of the matching head; 0: its input's, 3 × config.model.embed_dim
  return c


def check_gram_section(config: ml_collections.ConfigDict) -> None:
  """τ >= 0 (0: learned), ε in [0, 1), dam_weight >= 0, head_hidden >= 0, and an engine the volume has
  (a ValueError naming the key)."""
  c, where = config.gram, "config.gram."
  for key, ok, expected in (("temperature", c.temperature >= 0 and math.isfinite(c.temperature),
                             "a finite number >= 0 (0: the model's learned logit scale is 1/τ)"),
                            ("label_smoothing", 0 <= c.label_smoothing < 1, "in [0, 1)"),
                            ("dam_weight", c.dam_weight >= 0 and math.isfinite(c.dam_weight), "a finite number >= 0"),
                            ("head_hidden", c.head_hidden >= 0, ">= 0 (0: 3 × `config.model.embed_dim`)")):
    if not ok:
      raise ValueError(f"`{where}{key}` must be {expected}, got {c[key]}.")
  impls = ("auto", "dense") + SHARDED_IMPLS
  if config.loss.impl not in impls:
    raise ValueError(f"`config.loss.impl` must be one of {impls} for `gram` (the volume is a determinant, built "
                     f"densely), got {config.loss.impl!r}.")


def gram_match_head(config: ml_collections.ConfigDict) -> models.MatchHead | None:
  """GRAM's matching head for `config` (`config.gram.head_hidden`, 0: 3 × `config.model.embed_dim`), or
  None when there is none to train (another loss, or `config.gram.dam_weight` = 0). The model holds it
  as its `match_head`; the loss applies the same module to `params["match_head"]`."""
  if config.loss.name != "gram" or not config.gram.dam_weight:
    return None
  return models.MatchHead(hidden=int(config.gram.head_hidden) or 3 * int(config.model.embed_dim))


# Folded into the run's seed before the draw counter, so that no draw key is an augmentation key
# (those are fold_in(key(seed), step)).
GRAM_NEGATIVES_STREAM = 0x6772616D


def gram_negatives_key(seed: int, draws: jax.Array) -> jax.Array:
  """The key of `losses.gram_negatives` at the `draws`-th loss applied: fold_in(fold_in(key(seed),
  `GRAM_NEGATIVES_STREAM`), draws)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), GRAM_NEGATIVES_STREAM), draws)


def gram_matching_loss(match_logits, text: jax.Array, image: jax.Array, negatives: losses.GramNegatives) -> jax.Array:
  r"""GRAM's data–anchor matching term: the 2-way cross-entropy of the head's logits on 3B pairs,

      (t_i, x_i) → 1,   (t_i, x_{data[i]}) → 0,   (t_{anchor[j]}, x_j) → 0       (i, j = 1..B)
      L_DAM = −(1/3B) Σ_pairs log softmax(match_logits(t, x))[label]

  with t the text (anchor) and x the image (data) embeddings (B, E), `negatives` the global indices of
  `losses.gram_negatives(t, x, ...)` and `match_logits(t, x)` → (N, 2) the head ([no match, match]).
  The authors' order (github.com/ispamm/GRAM, `model/gram.py`, `forward_ret`: true pairs, then each
  caption with a wrong data sample, then each data sample with a wrong caption, labels [1]·B + [0]·2B).
  The negatives' embeddings are gathered with their gradient (the authors' `all_gather_with_grad`)."""
  b = text.shape[0]
  anchors = jnp.concatenate([text, text, jnp.take(text, negatives.anchor, axis=0)])
  data = jnp.concatenate([image, jnp.take(image, negatives.data, axis=0), image])
  log_p = jax.nn.log_softmax(match_logits(anchors, data).astype(jnp.float32), axis=-1)
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def check_ce_clip_section(c: ml_collections.ConfigDict) -> None:
  """Weights >= 0, H >= 1, threshold_min <= threshold_max (a ValueError naming the key)."""
  where = "config.ce_clip."
  for key, ok, expected in (("imc_weight", c.imc_weight >= 0, ">= 0"), ("cmr_weight", c.cmr_weight >= 0, ">= 0"),
                            ("num_hard_negatives", c.num_hard_negatives >= 1, ">= 1"),
                            ("threshold_max", c.threshold_max >= c.threshold_min,
                             f">= `{where}threshold_min` ({c.threshold_min})")):
    if not ok:
      raise ValueError(f"`{where}{key}` must be {expected}, got {c[key]}.")


def check_isogclr_clip_section(c: ml_collections.ConfigDict) -> None:
  """τ₀ > 0, γ and β in [0, 1], η >= 0, ρ finite, 0 < τ_min <= τ_max (a ValueError naming the key)."""
  where = "config.isogclr_clip."
  for key, ok, expected in (("tau_init", c.tau_init > 0, "> 0"), ("gamma", 0 <= c.gamma <= 1, "in [0, 1]"),
                            ("beta", 0 <= c.beta <= 1, "in [0, 1]"), ("eta", c.eta >= 0, ">= 0"),
                            ("rho", math.isfinite(c.rho), "finite"), ("tau_min", c.tau_min > 0, "> 0"),
                            ("tau_max", c.tau_max >= c.tau_min, f">= `{where}tau_min` ({c.tau_min})")):
    if not ok:
      raise ValueError(f"`{where}{key}` must be {expected}, got {c[key]}.")


def stored_isogclr_clip_state(state: losses.IsogclrClipState) -> losses.IsogclrClipState:
  """The state as the train state keeps it: log u = −inf (unseen) stored as `base.UNSEEN_LOG_U`."""
  return base.stored_log_u(state, LOG_U_FIELDS)


def loss_isogclr_clip_state(stored: losses.IsogclrClipState) -> losses.IsogclrClipState:
  """The inverse of `stored_isogclr_clip_state`: the state `losses.isogclr_clip` takes."""
  return base.loss_log_u(stored, LOG_U_FIELDS)


STATEFUL_LOSSES = ("isogclr_clip", "ce_clip")


class ImageText(base.Method):
  """(image, caption) pairs, a contrastive loss between the image and text embeddings."""

  loss_names = ("clip", "siglip")
  image_text = True

  def check(self, config):
    super().check(config)
    scale = config.loss.logit_scale_init
    if not (scale > 0 and math.isfinite(scale)):
      raise ValueError(f"`config.loss.logit_scale_init` must be a finite number > 0 (the model learns its "
                       f"logarithm), got {scale}.")

  def text_side(self, config, info):
    return text.TokenText(config, info)

  def build_model(self, config, text_side):
    m = config.model
    text_tower = models.build_model(
        m.text_encoder, vocab_size=text_side.vocab_size, width=m.text_width, depth=m.text_depth,
        heads=m.text_heads, max_len=m.text_max_len, dtype=jnp.dtype(m.dtype), remat=m.remat)
    return self.dual_encoder(config, text_tower, m.embed_dim)

  def dual_encoder(self, config, text_tower, embed_dim: int) -> models.DualEncoder:
    bias = config.loss.logit_bias_init if config.loss.name == "siglip" else None
    scale_init = math.log(config.loss.logit_scale_init)  # the model learns log(scale), CLIP-style
    return models.DualEncoder(base.build_encoder(config), text_tower, embed_dim, scale_init, bias,
                              max_logit_scale=100.0, match_head=gram_match_head(config))

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None, params=None):
    engine = base.engine_options(config, mesh)
    if config.loss.name == "gram":
      return self.gram_loss(config, outputs, state, params, engine) + ({},)
    if config.loss.name == "ce_clip":
      c = config.ce_clip
      out = losses.ce_clip(outputs["image"], outputs["text"], outputs["hard_negatives"],
                           logit_scale=outputs["logit_scale"], thresholds=state["thresholds"],
                           valid=batch["hard_negative_valid"], imc_weight=c.imc_weight, cmr_weight=c.cmr_weight,
                           threshold_range=(c.threshold_min, c.threshold_max), **engine)
      return out.loss, {"thresholds": out.thresholds}, {}
    if config.loss.name == "isogclr_clip":
      c = config.isogclr_clip
      out = losses.isogclr_clip(outputs["image"], outputs["text"], batch["index"], loss_isogclr_clip_state(state),
                                gamma=c.gamma, rho=c.rho, eta=c.eta, beta=c.beta, tau_min=c.tau_min,
                                tau_max=c.tau_max, **engine)
      return out.loss, stored_isogclr_clip_state(out.state), {}
    if config.loss.name == "clip":
      return losses.clip(outputs["image"], outputs["text"], logit_scale=outputs["logit_scale"], **engine), state, {}
    return losses.siglip(outputs["image"], outputs["text"], logit_scale=outputs["logit_scale"],
                         logit_bias=outputs["logit_bias"], **engine), state, {}

  def gram_loss(self, config, outputs, state, params, engine) -> tuple[jax.Array, dict]:
    """(`losses.gram(text, image)` + dam_weight · `gram_matching_loss`, the new state): the matching
    head is `gram_match_head(config)` applied to `params["match_head"]`, the negatives drawn with
    `gram_negatives_key(config.seed, state["draws"])`, and the draw counter advanced."""
    c = config.gram
    text_emb, image_emb = outputs["text"], outputs["image"]
    temperature = c.temperature if c.temperature > 0 else 1.0 / outputs["logit_scale"]
    loss = losses.gram(text_emb, image_emb, temperature=temperature, label_smoothing=c.label_smoothing, **engine)
    head = gram_match_head(config)
    if head is None:
      return loss, state
    negatives = losses.gram_negatives(text_emb, image_emb, key=gram_negatives_key(config.seed, state["draws"]),
                                      temperature=temperature, **engine)
    match_logits = lambda t, x: head.apply({"params": params["match_head"]}, t, x)  # noqa: E731
    dam = gram_matching_loss(match_logits, text_emb, image_emb, negatives)
    return loss + c.dam_weight * dam, {"draws": state["draws"] + 1}

  def positive_pairs(self, outputs, extras):
    return outputs["image"], outputs["text"], ("accuracy_image_to_text", "accuracy_text_to_image")


class CLIP(ImageText):
  """CLIP, and the image–text losses with state of their own (`STATEFUL_LOSSES`)."""

  name = "clip"
  loss_names = ImageText.loss_names + STATEFUL_LOSSES + ("gram",)
  loss_reads_params = True  # gram: the matching head's parameters

  def check(self, config):
    super().check(config)
    if config.loss.name == "isogclr_clip":
      check_isogclr_clip_section(config.isogclr_clip)
    if config.loss.name == "ce_clip":
      check_ce_clip_section(config.ce_clip)
    if config.loss.name == "gram":
      check_gram_section(config)

  def config_sections(self):
    return {"isogclr_clip": isogclr_clip_section(), "ce_clip": ce_clip_section(), "gram": gram_section()}

  def text_side(self, config, info):
    """ce_clip: `config.ce_clip.num_hard_negatives` hard-negative captions per caption."""
    if config.loss.name != "ce_clip":
      return super().text_side(config, info)
    return text.TokenText(config, info, hard_negatives=config.ce_clip.num_hard_negatives,
                          where="config.ce_clip.num_hard_negatives")

  def grad_cache_conflict(self, config):
    return "per-example loss state" if config.loss.name in STATEFUL_LOSSES else None

  def init_state(self, config, variables, key, num_ids):
    """isogclr_clip: `losses.isogclr_clip_state(num_ids, tau_init=config.isogclr_clip.tau_init)` as stored
    (`stored_isogclr_clip_state`); ce_clip: {"thresholds": zeros (H,)} (θ starts at 0, as the authors'
    does); gram with its matching term: {"draws": 0} (`gram_negatives_key`); {} for clip."""
    if config.loss.name == "isogclr_clip":
      return stored_isogclr_clip_state(
          losses.isogclr_clip_state(int(num_ids), tau_init=config.isogclr_clip.tau_init))
    if config.loss.name == "ce_clip":
      return {"thresholds": jnp.zeros((int(config.ce_clip.num_hard_negatives),), jnp.float32)}
    if gram_match_head(config) is not None:
      return {"draws": jnp.zeros((), jnp.int32)}
    return {}

  def state_shardings(self, mesh, abstract):
    """isogclr_clip's per-example arrays split along the example axis over the batch mesh axes; CE-CLIP's
    (H,) thresholds and GRAM's draw counter replicated."""
    if isinstance(abstract, losses.IsogclrClipState):
      return jax.tree.map(lambda x: devices.example_sharding(mesh, x), abstract)
    return jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), abstract)


class SigLIP(ImageText):
  name = "siglip"


class LiT(ImageText):
  name = "lit"

  def text_side(self, config, info):
    return text.LockedText(config, info)

  def build_model(self, config, text_side):
    return self.dual_encoder(config, None, text_side.embed_dim)


base.register(CLIP())
base.register(SigLIP())
base.register(LiT())
