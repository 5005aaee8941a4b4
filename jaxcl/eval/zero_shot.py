"""Zero-shot classification with a dual encoder: class embeddings from prompt ensembles."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxcl.eval import _common
from jaxcl.losses._common import l2_normalize

Template = str | Callable[[str], str]


def _fill(template: Template, name: str, index: int) -> str:
  if callable(template):
    text = template(name)
    if not isinstance(text, str):
      raise TypeError(f"`templates[{index}]` must return a str, got {type(text).__name__}.")
    return text
  if not isinstance(template, str) or "{}" not in template:
    raise ValueError(
        f"`templates[{index}]` must be a str containing '{{}}' (e.g. 'a photo of a {{}}.') or a "
        f"callable, got {template!r}."
    )
  return template.format(name)


def class_embeddings(
    encode_text: Callable[[list[str]], Any],
    class_names: Sequence[str],
    templates: Sequence[Template] = ("{}",),
) -> jax.Array:
  r"""One embedding per class by prompt ensembling, (C, D) float32 with unit rows.

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021),
  section 3.1.4: every template is filled with every class name, encoded and L2-normalised; a class's
  embedding is the normalised mean over its templates:

      e_c = normalize( (1/T) Σ_t normalize(encode_text(template_t(name_c))) )

  Args:
    encode_text: maps a list of T prompts to a (T, D) array; called once per class.
    class_names: the C class names, in label order.
    templates: T strings with a '{}' placeholder (e.g. 'a photo of a {}.') or callables name -> str.
  Returns:
    (C, D) float32, rows of unit norm.

  >>> import jax.numpy as jnp
  >>> encode = lambda texts: jnp.array([[len(t), 1.0] for t in texts])
  >>> e = class_embeddings(encode, ["a", "bb"], ["{}", "x {}"])
  >>> e.shape
  (2, 2)
  """
  if isinstance(class_names, str) or not len(class_names):
    raise ValueError(f"`class_names` must be a non-empty sequence of str, got {class_names!r}.")
  if isinstance(templates, str) or not len(templates):
    raise ValueError(f"`templates` must be a non-empty sequence of templates, got {templates!r}.")
  out = []
  for c, name in enumerate(class_names):
    if not isinstance(name, str):
      raise TypeError(f"`class_names[{c}]` must be a str, got {type(name).__name__}.")
    prompts = [_fill(t, name, i) for i, t in enumerate(templates)]
    emb = jnp.asarray(encode_text(prompts))
    want_dim = out[0].shape[0] if out else None
    if emb.ndim != 2 or emb.shape[0] != len(prompts) or (want_dim and emb.shape[1] != want_dim):
      shape = f"({len(prompts)}, {want_dim if want_dim else 'D'})"
      raise ValueError(
          f"`encode_text` must return shape {shape} for the {len(prompts)} prompts of class "
          f"{name!r}, got {emb.shape}."
      )
    if not jnp.issubdtype(emb.dtype, jnp.floating):
      raise TypeError(f"`encode_text` must return floating-point embeddings, got dtype {emb.dtype}.")
    mean = jnp.mean(l2_normalize(emb.astype(jnp.float32)), axis=0)
    out.append(l2_normalize(mean))
  return jnp.stack(out)


def zero_shot_logits(image_emb: jax.Array, class_emb: jax.Array) -> jax.Array:
  r"""Cosine similarities <x̂_i, ê_c> of images and class embeddings, (N, C) float32.

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021).

  >>> import jax.numpy as jnp
  >>> zero_shot_logits(jnp.array([[2.0, 0.0]]), jnp.array([[1.0, 0.0], [1.0, 1.0]])).round(4)
  Array([[1.    , 0.7071]], dtype=float32)
  """
  image_emb = _common.check_embeddings("image_emb", image_emb)
  class_emb = _common.check_embeddings("class_emb", class_emb)
  _common.check_same_dim("image_emb", image_emb, "class_emb", class_emb)
  return jnp.einsum(
      "nd,cd->nc", l2_normalize(image_emb), l2_normalize(class_emb), preferred_element_type=jnp.float32
  )


def zero_shot_accuracy(
    image_emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    *,
    top_k: int = 1,
    chunk: int = 1024,
) -> jax.Array:
  r"""Zero-shot (top-k) accuracy: is the label among the k classes most similar to the image?

  "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al., 2021):

      prediction_i = argmax_c <x̂_i, ê_c>,     accuracy = mean_i [ y_i ∈ top_k_c <x̂_i, ê_c> ]

  Ties count against the label: it is in the top k when fewer than k other classes are at least as
  similar (so collapsed embeddings score 0, not 1). Images are processed `chunk` rows at a time.

  Args:
    image_emb: (N, D) image embeddings. class_emb: (C, D), e.g. from `class_embeddings`.
    labels: (N,) ints in [0, C). top_k: k >= 1. chunk: image rows per step.
  Returns:
    Float32 scalar in [0, 1].

  >>> import jax.numpy as jnp
  >>> classes = jnp.eye(3)
  >>> images = jnp.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0]])
  >>> float(zero_shot_accuracy(images, classes, jnp.array([0, 1])))
  0.5
  """
  image_emb = _common.check_embeddings("image_emb", image_emb)
  class_emb = _common.check_embeddings("class_emb", class_emb)
  _common.check_same_dim("image_emb", image_emb, "class_emb", class_emb)
  labels = _common.check_class_labels("labels", labels, image_emb.shape[0], class_emb.shape[0])
  top_k = min(_common.check_positive_int("top_k", top_k), class_emb.shape[0])
  chunk = _common.check_positive_int("chunk", chunk)
  return _zero_shot_accuracy(image_emb, class_emb, labels, jnp.int32(top_k), chunk=chunk)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _zero_shot_accuracy(image_emb, class_emb, labels, top_k, *, chunk):
  classes = l2_normalize(class_emb)
  num_classes = classes.shape[0]

  def hits(rows):
    images, y = rows
    logits = jnp.einsum("nd,cd->nc", l2_normalize(images), classes, preferred_element_type=jnp.float32)
    true = jnp.take_along_axis(logits, y[:, None], axis=1)
    others = (logits >= true) & (jnp.arange(num_classes) != y[:, None])
    return jnp.sum(others, axis=1) < top_k

  return jnp.mean(_common.map_chunks(hits, (image_emb, labels), chunk).astype(jnp.float32))
