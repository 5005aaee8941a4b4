"""Several positives per anchor: 1-to-K cross-lingual contrast and the poly-view critics.

| paper | function | engines |
|---|---|---|
| Improving the Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive Learning | one_to_k_clip | all |
| Poly-View Contrastive Learning | poly_view | all |

(The multi-view objectives of Koromilas et al. 2025 are `jaxcl.losses.multiview_infonce` / `mv_dhel`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import _checks
from jaxcl import ops
from jaxcl.losses import _common


@_common.keyword_only
def one_to_k_clip(
    image: jax.Array,
    texts: jax.Array,
    *,
    logit_scale: float | jax.Array,
    normalize: bool = True,
    impl: str = "auto",
) -> jax.Array:
  r"""1-to-K contrastive loss: each image against its K captions (one per language) at once.

  "Improving the Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive Learning"
  (Nie et al., KDD 2024). Image i has K positive texts t_{i,1..K} (the same caption in K languages);
  every language of every other image is a negative, all in ONE softmax so that no language is ranked
  against the image separately. With s(a, b) = logit_scale · <a, b>:

      L_i2t = mean_i −(1/K) Σ_k log [ e^{s(v_i, t_ik)} / Σ_{j, k'} e^{s(v_i, t_jk')} ]
            = mean_i [ log Σ_{j,k'} e^{s(v_i, t_jk')} − (1/K) Σ_k s(v_i, t_ik) ]
      L_t2i = mean_{i,k} −log [ e^{s(t_ik, v_i)} / Σ_j e^{s(t_ik, v_j)} ]
      loss  = ½ (L_i2t + L_t2i / K)

  The 1/K on the text-to-image term follows the authors' code (BUAADreamer/CCRK, `models/xvlm.py`
  `get_unialign_contrastive_loss` with its default `need_divm=0`: the i2t sum over the K positives and
  the whole symmetric loss are divided by K). With K = 1 this is `clip`. One engine pass over the (B, K·B) image–text matrix gives both
  directions (row and column log-sum-exp); the positive term is linear in S (<v_i, Σ_k t_ik>).

  Args:
    image: (B, D). texts: (K, B, D), texts[k, i] the caption of image i in language k.
    logit_scale: the multiplier 1/τ (> 0, may be traced).
    normalize: L2-normalise first.
    impl: similarity engine.
  Returns:
    Scalar float32 mean loss.

  >>> import jax.numpy as jnp
  >>> v = jnp.eye(2)
  >>> round(float(one_to_k_clip(v, jnp.stack([v, v]), logit_scale=1.0)), 4)  # K = 2 identical languages
  0.5815

  (i2t: log(2e + 2) − 1, the 4 texts against the mean positive 1; t2i: log(e + 1) − 1, halved; their mean.)
  """
  v = _common.embeddings("image", image, normalize=normalize)
  t = _checks.check_array("texts", texts, ndim=3)
  if t.shape[1:] != v.shape:
    raise ValueError(f"`texts` must have shape (K, {v.shape[0]}, {v.shape[1]}) to match `image`, got {t.shape}.")
  t = _common.maybe_normalize(t, normalize)
  k, b, d = t.shape
  scale = _common.logit_scale(logit_scale)
  flat = jnp.reshape(t, (k * b, d))
  lse = ops.logsumexp(v, flat, scale=scale, rows=True, cols=True, impl=impl)
  v32 = v.astype(jnp.float32)
  pos = scale * jnp.einsum("id,kid->ki", v32, t.astype(jnp.float32))  # (K, B)
  i2t = jnp.mean(lse.rows - jnp.mean(pos, axis=0))
  t2i = jnp.mean(jnp.reshape(lse.cols, (k, b)) - pos)
  return 0.5 * (i2t + t2i / k)


def _views(views, normalize):
  views = _checks.check_array("views", views, ndim=3)
  if views.shape[0] < 2:
    raise ValueError(f"`views` must hold at least 2 views along axis 0 (shape (M, B, D)), got {views.shape}.")
  _checks.check_min_batch("views", views, 2, axis=1, why="a contrastive loss needs a negative")
  return _common.maybe_normalize(views, normalize)


@_common.keyword_only
def poly_view(
    views: jax.Array,
    *,
    critic: str = "geometric",
    temperature: float | jax.Array = 0.1,
    normalize: bool = True,
    impl: str = "auto",
) -> jax.Array:
  r"""Poly-view contrastive loss with the geometric or arithmetic one-vs-rest critic.

  "Poly-View Contrastive Learning" (Shidani et al., ICLR 2024). Each of B samples has M >= 2 views
  x_{i,1..M}; view α of sample i is contrasted against the *set* of its other views X_{i,\α}, with a
  one-vs-rest critic built from the two-view critic f(x, y) = <x, y>/τ:

      geometric:   F(x, X_{j,\α}) = (1/(M−1)) Σ_{β≠α} f(x, x_{jβ}) = <x, mean_{β≠α} x_{jβ}> / τ
      arithmetic:  F(x, X_{j,\α}) = log (1/(M−1)) Σ_{β≠α} exp f(x, x_{jβ})

      loss = (1/M) Σ_α mean_i [ −F(x_iα, X_{i,\α}) + log Σ_j exp F(x_iα, X_{j,\α}) ]

  the one-vs-rest InfoNCE over the B samples (the positive set of sample i competes with the view sets
  of every sample j). Choices where the text leaves a detail open: the 1/(M−1) normalisations cancel
  between numerator and denominator and are dropped; the geometric critic uses the plain mean of the
  other views' (normalised) embeddings, not re-normalised.

  With M = 2 both critics are the two-view one and the loss is `clip(views[0], views[1],
  logit_scale=1/τ)` (InfoNCE in both directions, no same-view negatives).

  Engines: geometric — M passes of a (B, B) log-sum-exp of x_α against the means m_{j,\α} = (Σ_β x_jβ −
  x_jα)/(M−1); arithmetic — one (MB)² log-sum-exp per row with the same-view pairs excluded
  (`exclude` on view ids: Σ_j Σ_{β≠α} exp f). Every engine applies; the numerators need only the
  per-sample M×M Gram matrices.

  Args:
    views: (M, B, D), views[α, i] the α-th view of sample i.
    critic: "geometric" or "arithmetic".
    temperature: τ > 0 (may be traced).
    normalize: L2-normalise every view first.
    impl: similarity engine.
  Returns:
    Scalar float32 mean loss.

  >>> import jax.numpy as jnp
  >>> v = jnp.stack([jnp.eye(2)] * 3)  # 3 identical views of 2 orthogonal samples
  >>> round(float(poly_view(v, temperature=1.0)), 4)  # log(e + 1) - 1
  0.3133
  """
  _checks.check_choice("critic", critic, ("geometric", "arithmetic"))
  x = _views(views, normalize)
  inv_t = _common.inverse_temperature(temperature)
  m, b, d = x.shape
  x32 = x.astype(jnp.float32)
  if critic == "geometric":
    total = jnp.sum(x32, axis=0)
    terms = []
    for a in range(m):
      rest = (total - x32[a]) / (m - 1)  # (B, D) mean of the other views of every sample
      lse = ops.logsumexp(x[a], rest, scale=inv_t, impl=impl).rows
      terms.append(jnp.mean(lse - inv_t * _common.rowwise_dot(x32[a], rest)))
    return jnp.mean(jnp.stack(terms))
  z = jnp.reshape(x, (m * b, d))
  view = jnp.repeat(jnp.arange(m, dtype=jnp.int32), b)
  lse = ops.logsumexp(z, z, scale=inv_t, exclude=(view, view), impl=impl).rows  # (M·B,)
  gram = jnp.einsum("aid,bid->iab", x32, x32)  # per-sample M×M
  off = ~jnp.eye(m, dtype=bool)
  positive = jax.nn.logsumexp(inv_t * gram, axis=2, where=off[None])  # (B, M): log Σ_{β≠α} e^{f}
  return jnp.mean(jnp.reshape(lse, (m, b)) - positive.T)
