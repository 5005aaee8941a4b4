"""jaxcl.grad_cache: chunked gradients equal the unchunked `jax.value_and_grad` (every loss, engine and
mesh), randomness and per-chunk aux as documented, errors before compute, activation memory ~1/k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcl import grad_cache, losses

B, D_IN, D = 64, 12, 8


def tower(seed, d_in=D_IN, hidden=16, d_out=D):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), jnp.float32),
          "b1": jnp.asarray(rng.normal(size=(hidden,)) * 0.1, jnp.float32),
          "ln": jnp.asarray(1 + 0.2 * rng.normal(size=(hidden,)), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(hidden, d_out)) / 4, jnp.float32)}


def mlp(p, x, key=None, rate=0.0):
  """Dense -> gelu -> layer norm (row-wise: an example's embedding does not depend on the others) ->
  dropout (with a key) -> dense."""
  h = jax.nn.gelu(x @ p["w1"] + p["b1"])
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5) * p["ln"]
  if key is not None:
    h = jnp.where(jax.random.bernoulli(key, 1 - rate, h.shape), h / (1 - rate), 0.0)
  return h @ p["w2"]


def problem(name, impl, mesh=None):
  """(params, batch, embed, loss) of one objective: one tower and two views (nt_xent, supcon) or two
  towers (clip, siglip); learnable temperature / scale / bias live in params."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
  y = jnp.asarray(x + 0.3 * rng.normal(size=(B, D_IN)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, B), jnp.int32)
  kw = {"impl": impl, "mesh": mesh} if mesh is not None else {"impl": impl}
  if name in ("nt_xent", "supcon"):
    params = {"tower": tower(2), "log_t": jnp.asarray(np.log(0.3), jnp.float32)}
    batch = {"view1": x, "view2": y}

    def embed(p, chunk, key=None):
      keys = (None, None) if key is None else jax.random.split(key)
      return {"z1": mlp(p["tower"], chunk["view1"], keys[0], 0.2),
              "z2": mlp(p["tower"], chunk["view2"], keys[1], 0.2)}

    if name == "nt_xent":
      def loss(p, e):
        return losses.nt_xent(e["z1"], e["z2"], temperature=jnp.exp(p["log_t"]), **kw)
    else:
      def loss(p, e, labels):
        feats = jnp.concatenate([e["z1"], e["z2"]])
        return losses.supcon(feats, jnp.concatenate([labels, labels]), temperature=jnp.exp(p["log_t"]), **kw)
    return params, batch, embed, loss, ((labels,) if name == "supcon" else ())
  params = {"image": tower(3), "text": tower(4, d_in=D_IN), "log_scale": jnp.asarray(np.log(10.0), jnp.float32)}
  if name == "siglip":
    params["bias"] = jnp.asarray(-3.0, jnp.float32)
  batch = {"image": x, "text": y}

  def embed(p, chunk, key=None):
    keys = (None, None) if key is None else jax.random.split(key)
    return {"image": mlp(p["image"], chunk["image"], keys[0], 0.2),
            "text": mlp(p["text"], chunk["text"], keys[1], 0.2)}

  if name == "clip":
    def loss(p, e):
      return losses.clip(e["image"], e["text"], logit_scale=jnp.exp(p["log_scale"]), **kw)
  else:
    def loss(p, e):
      return losses.siglip(e["image"], e["text"], logit_scale=jnp.exp(p["log_scale"]), logit_bias=p["bias"], **kw)
  return params, batch, embed, loss, ()


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name, impl, chunk_counts", [
    ("nt_xent", "dense", (4,)), ("clip", "dense", (1, 4, 16)), ("clip", "blockwise", (4,)),
    ("siglip", "dense", (4,)), ("supcon", "dense", (4,)), ("supcon", "blockwise", (8,)),
])
def test_chunked_equals_unchunked(name, impl, chunk_counts):
  """Loss value and every parameter's gradient (towers and the loss's own temperature / scale / bias)
  equal `jax.value_and_grad` of the unchunked loss to 1e-5, float32."""
  params, batch, embed, loss, args = problem(name, impl)
  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, embed(p, batch), *args)))(params)
  for chunks in chunk_counts:
    got, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=chunks))(params, batch, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_trees_close(grads, want_grads)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(want_grads))  # nothing trivially zero


def test_unrolled_chunk_loops_give_the_same_gradient():
  params, batch, embed, loss, _ = problem("siglip", "dense")
  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, embed(p, batch))))(params)
  got, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=4, unroll=True))(params, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_trees_close(grads, want_grads)


@pytest.mark.parametrize("name, impl", [("clip", "ring"), ("siglip", "ring"), ("nt_xent", "allgather")])
def test_chunked_equals_unchunked_with_the_batch_split_over_devices(name, impl):
  """The batch split over 8 devices, the loss a sharded engine under `mesh=`: `shards=8` makes every
  chunk take its rows from every device; equal to the unchunked gradient, and the embeddings keep
  the batch's order (a permuted order would pair the wrong image and text)."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  params, batch, embed, loss, args = problem(name, impl, mesh)
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, embed(p, batch))))(params)
  got, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=4, shards=8))(params, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_trees_close(grads, want_grads)


@pytest.mark.parametrize("impl", ["ring"])  # one-device engines: test_chunked_equals_unchunked
def test_vision_transformer_tower(impl):
  """A real encoder: CLIP with a ViT image tower (patch embedding, attention, layer norm, [CLS] pool,
  dropout through flax's "dropout" rng, which the chunk's key feeds in both passes) and the MLP text
  tower. Chunked (4 chunks; with the ring engine over 8 devices, `shards=8`) equals the unchunked
  gradient of the same chunk forwards to 1e-5 in float32."""
  from jaxcl.models import ViT

  vit = ViT(patch_size=4, hidden=16, depth=1, heads=2, mlp_dim=32, dropout=0.1)
  rng = np.random.default_rng(5)
  batch = {"image": jnp.asarray(rng.uniform(size=(B, 8, 8, 3)), jnp.float32),
           "text": jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)}
  params = {"image": vit.init(jax.random.key(0), batch["image"][:2])["params"], "text": tower(4, d_out=16),
            "log_scale": jnp.asarray(np.log(10.0), jnp.float32)}
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",)) if impl == "ring" else None
  kw = {"impl": impl, "mesh": mesh} if mesh is not None else {"impl": impl}
  shards = 8 if mesh is not None else 1
  if mesh is not None:
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  key, chunks = jax.random.key(3), 4

  def embed(p, chunk, key):
    image = vit.apply({"params": p["image"]}, chunk["image"], train=True, rngs={"dropout": key})
    return {"image": image, "text": mlp(p["text"], chunk["text"])}

  def loss(p, e):
    return losses.clip(e["image"], e["text"], logit_scale=jnp.exp(p["log_scale"]), **kw)

  def by_hand(p):  # the chunks as grad_cache cuts them: rows [c*r, (c+1)*r) of every shard
    per_shard = jax.tree.map(lambda x: x.reshape((shards, chunks, -1) + x.shape[1:]), batch)
    parts = [embed(p, jax.tree.map(lambda x: x[:, c].reshape((-1,) + x.shape[3:]), per_shard),
                   jax.random.fold_in(key, c)) for c in range(chunks)]
    stacked = jax.tree.map(lambda *e: jnp.stack([x.reshape((shards, -1) + x.shape[1:]) for x in e], 1), *parts)
    return loss(p, jax.tree.map(lambda x: x.reshape((B,) + x.shape[3:]), stacked))

  want, want_grads = jax.jit(jax.value_and_grad(by_hand))(params)
  got, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=chunks, shards=shards))(params, batch, key=key)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_trees_close(grads, want_grads)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(want_grads))


def test_dropout_sees_the_same_masks_in_both_passes():
  """With `key=`, chunk c runs with fold_in(key, c) in the first and the second pass: the result is the
  gradient of the loss of exactly those chunk forwards (built here by hand), not of fresh masks."""
  params, batch, embed, loss, _ = problem("clip", "dense")
  key, chunks = jax.random.key(7), 4

  def by_hand(p):
    parts = [embed(p, jax.tree.map(lambda x: grad_cache.to_chunks(x, chunks)[c], batch), jax.random.fold_in(key, c))
             for c in range(chunks)]
    return loss(p, jax.tree.map(lambda *e: jnp.concatenate(e), *parts))

  want, want_grads = jax.jit(jax.value_and_grad(by_hand))(params)
  got, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=chunks))(params, batch, key=key)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_trees_close(grads, want_grads)
  no_dropout, _ = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=chunks))(params, batch)
  assert abs(float(got) - float(no_dropout)) > 1e-3  # the masks were applied


def test_aux_of_the_loss_and_of_each_chunk():
  """has_aux: the loss's aux as `jax.value_and_grad` gives it; embed_has_aux: each chunk's aux (here
  the chunk's batch mean, as BatchNorm would use) stacked over the chunks in order."""
  params, batch, embed, loss, _ = problem("clip", "dense")

  def embed_with_stats(p, chunk):
    e = embed(p, chunk)
    return e, jnp.mean(chunk["image"], axis=0)

  def loss_with_aux(p, e):
    return loss(p, e), {"norm": jnp.mean(jnp.linalg.norm(e["image"], axis=1))}

  run = grad_cache.value_and_grad(embed_with_stats, loss_with_aux, chunks=4, has_aux=True, embed_has_aux=True)
  (value, aux), grads = jax.jit(run)(params, batch)
  (want, want_aux), want_grads = jax.jit(
      jax.value_and_grad(lambda p: loss_with_aux(p, embed(p, batch)), has_aux=True))(params)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(aux["loss"]["norm"], want_aux["norm"], rtol=1e-5)
  np.testing.assert_allclose(aux["embed"], np.asarray(batch["image"]).reshape(4, B // 4, D_IN).mean(1), rtol=1e-5,
                             atol=1e-6)
  assert_trees_close(grads, want_grads)


def test_bfloat16_parameters_accumulate_in_float32():
  """bf16 parameters: gradients come back in bf16, summed over the chunks in float32, within bf16
  rounding of the float32 gradient."""
  params, batch, embed, loss, _ = problem("clip", "dense")
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  _, grads = jax.jit(grad_cache.value_and_grad(embed, loss, chunks=8))(half, batch)
  _, want = jax.jit(jax.value_and_grad(lambda p: loss(p, embed(p, batch))))(
      jax.tree.map(lambda x: x.astype(jnp.float32), half))
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.03 * scale + 1e-6)


def test_bad_arguments_fail_before_compute():
  params, batch, embed, loss, _ = problem("clip", "dense")
  with pytest.raises(ValueError, match=r"^`chunks`=3 must divide the batch of 64 examples\.$"):
    grad_cache.value_and_grad(embed, loss, chunks=3)(params, batch)
  with pytest.raises(ValueError, match=r"`chunks`=4 must divide the batch of 64 examples on each of the "
                                       r"`shards`=32 shards \(64 / 32 per shard\)"):
    grad_cache.value_and_grad(embed, loss, chunks=4, shards=32)(params, batch)
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match=r"^`chunks` must be a positive int, got"):
      grad_cache.value_and_grad(embed, loss, chunks=bad)
  with pytest.raises(ValueError, match=r"^`shards` must be a positive int, got 0"):
    grad_cache.value_and_grad(embed, loss, chunks=2, shards=0)
  with pytest.raises(ValueError, match=r"same leading \(example\) axis, got sizes \['32', '64'\]"):
    grad_cache.value_and_grad(embed, loss, chunks=2)(params, {"image": batch["image"], "text": batch["text"][:32]})


@pytest.mark.parametrize("unroll", [False, True])
def test_activation_memory_falls_with_the_chunks(unroll):
  """Compiled (XLA CPU) temporaries of a 6-layer, 1024-wide MLP's clip gradient at B = 4,096: with 8
  chunks at most a third of the unchunked step's (the activations are about 1/8), the chunk loops
  as loops or unrolled (where only the order the chunks are sliced in keeps them apart)."""
  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.normal(size=(1024, 1024)) / 32, jnp.float32) for _ in range(6)]

  def embed(p, chunk):
    h = chunk["x"]
    for w in p:
      h = jnp.tanh(h @ w)
    return {"a": h[:, :64], "b": h[:, 64:128]}

  def loss(p, e):
    return losses.clip(e["a"], e["b"], logit_scale=10.0, impl="blockwise")

  batch = {"x": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  temps = {}
  for chunks in (1, 8):
    run = grad_cache.value_and_grad(embed, loss, chunks=chunks, unroll=unroll)
    compiled = jax.jit(run).lower(shapes, batch).compile()
    temps[chunks] = compiled.memory_analysis().temp_size_in_bytes
  unchunked = jax.jit(jax.value_and_grad(lambda p, b: loss(p, embed(p, b)))).lower(shapes, batch).compile()
  assert temps[1] >= 0.9 * unchunked.memory_analysis().temp_size_in_bytes
  assert temps[8] <= temps[1] / 3, temps
