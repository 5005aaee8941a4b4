"""Hyperbolic image–text learning in the Lorentz model: MERU's exponential map, geodesic distance,
entailment cones and the MERU loss.

Points of the hyperboloid of curvature −c, {x ∈ R^{D+1} : <x, x>_L = −1/c, x_time > 0}, are stored by
their space components x_s (D,) only; the time component is x_t = sqrt(1/c + ‖x_s‖²) and the Lorentzian
inner product is <x, y>_L = <x_s, y_s> − x_t y_t.

| paper | function | engines |
|---|---|---|
| Hyperbolic Image-Text Representations | meru | dense, allgather, ring (keys gathered) |
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common
from jaxcl.ops.engines import SHARDED_IMPLS

_EPS = 1e-6  # float32 guard for acosh / asin / acos arguments and norms


def _curvature(curvature) -> jax.Array:
  _checks.check_positive("curvature", curvature)
  c = jnp.asarray(curvature, jnp.float32)
  if c.shape != ():
    raise ValueError(f"`curvature` must be a scalar, got shape {c.shape}.")
  return c


def _norm(x: jax.Array) -> jax.Array:
  """‖x‖ over the last axis with a finite gradient at 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), _EPS * _EPS))


def _time(x: jax.Array, c: jax.Array) -> jax.Array:
  return jnp.sqrt(1.0 / c + jnp.sum(x * x, axis=-1))


_MAX_SINH_ARG = float(np.arcsinh(2.0**15))


@_common.keyword_only
def lorentz_expmap0(v: jax.Array, *, curvature: float | jax.Array = 1.0) -> jax.Array:
  r"""Exponential map at the hyperboloid's origin: tangent vector v (D,) -> space components (D,).

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023), eq. (3):

      x_s = sinh(√c ‖v‖) · v / (√c ‖v‖),        x_t = sqrt(1/c + ‖x_s‖²)

  Computed in float32 (returned in float32); ‖v‖ = 0 maps to the origin with a finite gradient. As in
  the authors' code (`exp_map0` in meru/lorentz.py), the sinh argument √c‖v‖ is clamped at asinh(2¹⁵) ≈
  11.09, so a large tangent vector cannot overflow float32 (its image stops moving outward there).

  >>> import jax.numpy as jnp
  >>> x = lorentz_expmap0(jnp.array([[1.0, 0.0]]))  # sinh(1)
  >>> round(float(x[0, 0]), 4)
  1.1752
  """
  v = _checks.check_array("v", v, ndim=(1, 2, 3))
  c = _curvature(curvature)
  v = v.astype(jnp.float32)
  r = jnp.sqrt(c) * _norm(v)[..., None]
  return jnp.sinh(jnp.minimum(r, _MAX_SINH_ARG)) / r * v


@_common.keyword_only
def lorentz_distance(x: jax.Array, y: jax.Array, *, curvature: float | jax.Array = 1.0) -> jax.Array:
  r"""Pairwise geodesic distances between hyperboloid points given by space components, (N, M) float32.

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023), eq. (2):

      d(x, y) = (1/√c) · arccosh( −c <x, y>_L ),     <x, y>_L = <x_s, y_s> − x_t y_t

  The arccosh argument is clipped at 1 + 1e-6, so coincident points have distance ~0 and a finite
  gradient.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]])  # the origin and a point at distance arcsinh(1)
  >>> round(float(lorentz_distance(x, x)[0, 1]), 4)
  0.8814
  """
  x = _checks.check_array("x", x, ndim=2).astype(jnp.float32)
  y = _checks.check_array("y", y, ndim=2).astype(jnp.float32)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"`x` and `y` must have the same feature size, got {x.shape} and {y.shape}.")
  c = _curvature(curvature)
  inner = x @ y.T - _time(x, c)[:, None] * _time(y, c)[None, :]
  arg = -c * inner
  return jnp.arccosh(jnp.where(arg > 1.0 + _EPS, arg, 1.0 + _EPS)) / jnp.sqrt(c)


@_common.keyword_only
def half_aperture(x: jax.Array, *, curvature: float | jax.Array = 1.0, min_radius: float = 0.1):
  r"""Half-aperture of the entailment cone rooted at x (space components), in (0, π/2), float32.

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023), eq. (6), after "Hyperbolic
  Entailment Cones for Learning Hierarchical Embeddings" (Ganea et al., 2018):

      aper(x) = arcsin( 2K / (√c ‖x_s‖) ),     K = min_radius = 0.1

  (the arcsin argument is clipped to [−1 + 1e-6, 1 − 1e-6]: points within 2K/√c of the origin have
  the widest cone).

  >>> import jax.numpy as jnp
  >>> round(float(half_aperture(jnp.array([0.4, 0.0]))), 4)  # arcsin(0.5) = π/6
  0.5236
  """
  x = _checks.check_array("x", x, ndim=(1, 2)).astype(jnp.float32)
  c = _curvature(curvature)
  _checks.check_positive("min_radius", min_radius)
  ratio = 2.0 * min_radius / (jnp.sqrt(c) * _norm(x))
  return jnp.arcsin(jnp.clip(ratio, -1.0 + _EPS, 1.0 - _EPS))


@_common.keyword_only
def exterior_angle(x: jax.Array, y: jax.Array, *, curvature: float | jax.Array = 1.0) -> jax.Array:
  r"""Exterior angle at x of the hyperbolic triangle (origin, x, y), row by row, in (0, π), float32.

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023), eq. (7):

      ext(x, y) = arccos( (y_t + x_t · c<x, y>_L) / (‖x_s‖ · sqrt((c<x, y>_L)² − 1)) )

  y lies inside the cone of x when ext(x, y) <= aper(x).

  >>> import jax.numpy as jnp
  >>> x, y = jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 0.0]])  # y further out along x's geodesic
  >>> round(float(exterior_angle(x, y)[0]), 2)  # 0 up to the arccos clip at 1 − 1e-6
  0.0
  """
  x = _checks.check_array("x", x, ndim=(1, 2)).astype(jnp.float32)
  y = _checks.check_array("y", y, ndim=(1, 2)).astype(jnp.float32)
  _checks.check_same_shape("x", x, "y", y)
  c = _curvature(curvature)
  xt, yt = _time(x, c), _time(y, c)
  c_inner = c * (jnp.sum(x * y, axis=-1) - xt * yt)
  denominator = _norm(x) * jnp.sqrt(jnp.maximum(c_inner * c_inner - 1.0, _EPS))
  return jnp.arccos(jnp.clip((yt + c_inner * xt) / denominator, -1.0 + _EPS, 1.0 - _EPS))


@_common.keyword_only
def entailment_cone(
    general: jax.Array,
    specific: jax.Array,
    *,
    curvature: float | jax.Array = 1.0,
    min_radius: float = 0.1,
    reduction: str = "mean",
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""Entailment-cone loss: mean_i max(0, ext(g_i, s_i) − aper(g_i)), float32 scalar.

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023), eq. (8): the more general concept
  g (MERU: the text) must contain the more specific s (the image) in its cone. Inputs are space
  components on the hyperboloid (e.g. from `lorentz_expmap0`), (B, D) each, row-aligned.
  `reduction`: "mean", "sum" or "none" (the (B,) per-pair max(0, ext(g_i, s_i) − aper(g_i))). `mask`:
  None or bool (B,); False marks padding pairs, left out.

  >>> import jax.numpy as jnp
  >>> float(entailment_cone(jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 0.0]])))  # inside the cone
  0.0
  """
  general = _checks.check_array("general", general, ndim=2)
  specific = _checks.check_array("specific", specific, ndim=2)
  _checks.check_same_shape("general", general, "specific", specific)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, general.shape[0])
  return _common.reduce_loss(_entailment_terms(general, specific, curvature, min_radius), reduction, mask)


def _entailment_terms(general, specific, curvature, min_radius) -> jax.Array:
  """max(0, ext(g_i, s_i) − aper(g_i)) per pair, (B,) float32."""
  angle = exterior_angle(general, specific, curvature=curvature)
  aperture = half_aperture(general, curvature=curvature, min_radius=min_radius)
  return jax.nn.relu(angle - aperture)


@_common.keyword_only
@_common.shardable("image", "text", "mask")
def meru(
    image: jax.Array,
    text: jax.Array,
    *,
    curvature: float | jax.Array = 1.0,
    logit_scale: float | jax.Array = 1 / 0.07,
    entailment_weight: float | jax.Array = 0.2,
    min_radius: float = 0.1,
    expmap: bool = True,
    reduction: str = "mean",
    mask: jax.Array | None = None,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""MERU: CLIP-style contrastive loss on negative Lorentz distances plus an entailment-cone loss.

  "Hyperbolic Image-Text Representations" (Desai et al., ICML 2023). The encoders' outputs, already
  multiplied by MERU's learnable scalars α_img, α_txt (initialised to 1/√D), are lifted onto the
  hyperboloid with `lorentz_expmap0` (skip with `expmap=False` when the inputs already are space
  components). With logits S_ij = −logit_scale · d(image_i, text_j):

      L_cont = ½ mean_i [ −S_ii + log Σ_j exp S_ij ] + ½ mean_j [ −S_jj + log Σ_i exp S_ij ]
      L      = L_cont + λ · entailment_cone(general=text, specific=image)

  Defaults from the paper: c = 1 (learnable, clamped to [0.1, 10] there), logit_scale = 1/0.07,
  λ = 0.2, K = 0.1. `curvature` and `logit_scale` may be traced (learned).

  Engines: the distance is arccosh of a Lorentzian inner product, not a scaled dot product, so the
  B×B logits are built densely; `impl` accepts "dense" and "auto" (dense only: the log-sum-exp is
  over a non-linear function of <x, y>), and "allgather" | "ring" with `axis_name` / `mesh`: each
  device gathers the images and texts and builds its (B/n, B) blocks of rows and of columns densely
  (ring gathers the keys too: the formula needs every pair's distance).

  Args:
    image, text: (B, D) tangent vectors at the origin (or space components if `expmap=False`), B >= 2.
    curvature: c > 0. logit_scale: > 0. entailment_weight: λ >= 0. min_radius: K > 0.
    expmap: apply `lorentz_expmap0` to both inputs first.
    reduction: "mean", "sum" or "none": the (2B,) per-anchor terms, the B images i
      (−S_ii + log Σ_j exp S_ij + λ e_i), then the B texts j (−S_jj + log Σ_i exp S_ij + λ e_j), with
      e_i the entailment term of pair i; their mean is the loss (this device's 2B/n under
      `axis_name`: its images, then its texts).
    mask: None or bool (B,): False marks padding pairs, which are neither anchors nor negatives, and
      have no entailment term.
    impl: "dense" or "auto"; "allgather" | "ring" (or "auto") with `axis_name` / `mesh`.
    axis_name, mesh: see "Sharded batches" in `jaxcl.losses`.
  Returns:
    Scalar float32, or (2B,) with `reduction="none"`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0]])  # 1 from the origin each side: 2 apart
  >>> round(float(meru(x, x, logit_scale=1.0, entailment_weight=0.0)), 3)  # log(1 + e^-2)
  0.127
  """
  image = _checks.check_array("image", image, ndim=2)
  text = _checks.check_array("text", text, ndim=2)
  _checks.check_same_shape("image", image, "text", text)
  _common.check_global_batch("image", image, 2, axis_name, why="a contrastive loss needs a negative")
  _checks.check_choice("impl", impl, ("auto", "dense") if axis_name is None else ("auto",) + SHARDED_IMPLS)
  scale = _common.logit_scale(logit_scale)
  _checks.check_non_negative("entailment_weight", entailment_weight)
  _common.check_reduction(reduction)
  mask = _common.sample_mask(mask, image.shape[0])
  ops.resolve_impl("dense", image.shape[0], text.shape[0])
  if expmap:
    image = lorentz_expmap0(image, curvature=curvature)
    text = lorentz_expmap0(text, curvature=curvature)
  entail = jnp.asarray(entailment_weight, jnp.float32) * _entailment_terms(text, image, curvature, min_radius)
  valid = None if mask is None else jnp.concatenate([mask, mask])
  if axis_name is None:
    logits = -scale * lorentz_distance(image, text, curvature=curvature)
    diagonal = jnp.diagonal(logits)
    if mask is not None:  # a padding row keeps only padding columns: finite, dropped by the reduction
      logits = jnp.where(mask[:, None] == mask[None, :], logits, -jnp.inf)
    per_anchor = jnp.concatenate([jax.nn.logsumexp(logits, axis=1) - diagonal + entail,
                                  jax.nn.logsumexp(logits, axis=0) - diagonal + entail])
    return _common.reduce_loss(per_anchor, reduction, valid)
  # This device's image rows against every text, and its text columns against every image.
  gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
  rows = -scale * lorentz_distance(image, gather(text), curvature=curvature)  # (B/n, B)
  cols = -scale * lorentz_distance(gather(image), text, curvature=curvature)  # (B, B/n)
  ids = _common.batch_ids(image.shape[0], axis_name)
  diagonal = jnp.take_along_axis(rows, ids[:, None], axis=1)[:, 0]
  if mask is not None:
    every = gather(mask)
    rows = jnp.where(mask[:, None] == every[None, :], rows, -jnp.inf)
    cols = jnp.where(every[:, None] == mask[None, :], cols, -jnp.inf)
  per_anchor = jnp.concatenate([jax.nn.logsumexp(rows, axis=1) - diagonal + entail,
                                jax.nn.logsumexp(cols, axis=0) - diagonal + entail])
  return _common.reduce_loss(per_anchor, reduction, valid, axis_name)
