# ---
# jupyter:
#   colab:
#     provenance: []
#     toc_visible: true
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # jaxcl: a tour of the functional loss API
#
# Every contrastive loss of `jaxcl.losses` is a pure JAX function of embeddings: it drops into any
# `jit` / `grad` / `vmap` code and returns a float32 scalar. This notebook
# 1. calls every loss on small synthetic embeddings (aligned pairs against shuffled pairs),
# 2. shows what the temperature and the logit scale do,
# 3. runs the same losses on every similarity engine (`impl="dense" | "blockwise" | "pallas"`): the
#    values and gradients agree, the memory does not.
#
# Any runtime works; on a GPU or TPU runtime the `pallas` engine runs compiled instead of in Pallas
# interpret mode.

# %%
# jaxcl must be installed with its training extra (locally: `pip install -e '.[train]'` in your clone). On
# Colab, install it first, in a cell above, from your own copy of the repository:
#   your clone (on Google Drive, or cloned into /content):  !pip install -q '/path/to/jaxcl[train]'
#   or a wheel: `python -m build` in your clone, upload dist/jaxcl-*.whl, then
#   !pip install -q "$(ls /content/jaxcl-*.whl)[train]"
try:
  import jaxcl
except ImportError as error:
  raise ImportError(
      "jaxcl is not installed. Install it from your copy of the repository in a cell above, then rerun:\n"
      "  your clone:  !pip install -q '/path/to/jaxcl[train]'   (pip install -e for an editable install,\n"
      "               then Runtime > Restart session)\n"
      "  a wheel:     run `python -m build` in your clone, upload dist/jaxcl-*.whl to Colab, then\n"
      '               !pip install -q "$(ls /content/jaxcl-*.whl)[train]"'
  ) from error
print("jaxcl", jaxcl.__version__)

# %%
# Parameters (the tests shrink them with JAXCL_NB_* environment variables).
import os

BATCH = int(os.environ.get("JAXCL_NB_BATCH", 256))  # pairs in the synthetic batch
DIM = int(os.environ.get("JAXCL_NB_DIM", 32))  # embedding size
MEM_BATCHES = [int(b) for b in os.environ.get("JAXCL_NB_MEM_BATCHES", "512,1024,2048,4096,8192").split(",")]

# %%
import functools
import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxcl import losses, ops

print("backend:", jax.default_backend(), "| engines:", ops.available_impls())

# %% [markdown]
# ## Synthetic embeddings
#
# `BATCH` instances in 8 classes; each instance has three noisy *views* (`z1`, `z2`, `z3`). A pair
# (z1[i], z2[i]) is a positive; shuffling `z2` breaks every pair, so the losses below are lower on the
# aligned pairs than on the shuffled ones. The exceptions are by design: `uniformity`, `mlcd` and
# `spherical_z_loss` do not look at the second view (one batch against itself, or against the class
# centres), and `symile` and `gram` score *triples* (a multilinear product, a Gram volume), which are not
# large for three noisy copies of one vector: they become meaningful for embeddings trained with them.

# %%
classes = 8
keys = jax.random.split(jax.random.key(0), 6)
labels = jnp.arange(BATCH) % classes
centers = jax.random.normal(keys[0], (classes, DIM))
instance = centers[labels] + 0.8 * jax.random.normal(keys[1], (BATCH, DIM))
z1, z2, z3 = (instance + 0.4 * jax.random.normal(k, (BATCH, DIM)) for k in keys[2:5])
shuffled = jax.random.permutation(keys[5], BATCH)
queue = jax.random.normal(jax.random.key(1), (4 * BATCH, DIM))  # a MoCo-style queue of negatives
print(z1.shape, z2.shape, labels[:10])


# %% [markdown]
# ## Every loss, aligned against shuffled pairs
#
# Each entry maps the two views `(a, b)` to a loss; `|grad|` is the norm of the gradient with respect
# to `a`. The paper column is read from the function's docstring.

# %%
def paper(fn):
  fn = getattr(fn, "func", fn)
  found = re.search(r'"([^"]{12,})"', (fn.__doc__ or "").replace("\n  ", " "))
  return found.group(1) if found else ""

nt_xent_05 = functools.partial(losses.nt_xent, temperature=0.5)
tour = {
    "infonce": (losses.infonce, lambda a, b: losses.infonce(a, b, temperature=0.1)),
    "infonce + queue (MoCo)": (losses.infonce, lambda a, b: losses.infonce(
        a, b, temperature=0.2, negatives=queue, in_batch_negatives=False)),
    "nt_xent": (losses.nt_xent, lambda a, b: losses.nt_xent(a, b, temperature=0.5)),
    "dcl": (losses.dcl, lambda a, b: losses.dcl(a, b, temperature=0.1)),
    "dclw": (losses.dclw, lambda a, b: losses.dclw(a, b, temperature=0.1, sigma=0.5)),
    "clip": (losses.clip, lambda a, b: losses.clip(a, b, logit_scale=1 / 0.07)),
    "siglip": (losses.siglip, lambda a, b: losses.siglip(a, b, logit_scale=10.0, logit_bias=-10.0)),
    "supcon": (losses.supcon, lambda a, b: losses.supcon(jnp.stack([a, b], 1), labels, temperature=0.1)),
    "multiview_infonce": (losses.multiview_infonce,
                          lambda a, b: losses.multiview_infonce(jnp.stack([a, b, z3]), temperature=0.1)),
    "mv_dhel": (losses.mv_dhel, lambda a, b: losses.mv_dhel(jnp.stack([a, b, z3]), temperature=0.1)),
    "cwcl": (losses.cwcl, lambda a, b: losses.cwcl(a, b, temperature=0.1)),
    "symile": (losses.symile, lambda a, b: losses.symile(a, b, z3, logit_scale=10.0)),
    "alignment": (losses.alignment, lambda a, b: losses.alignment(a, b)),
    "uniformity": (losses.uniformity, lambda a, b: losses.uniformity(a)),
    "triplet": (losses.triplet, lambda a, b: losses.triplet(a, b, jnp.roll(b, 1, axis=0), margin=0.2)),
    "batch_hard_triplet": (losses.batch_hard_triplet,
                           lambda a, b: losses.batch_hard_triplet(jnp.concatenate([a, b]),
                                                                  jnp.tile(labels, 2))),
    "negative_cosine": (losses.negative_cosine, lambda a, b: losses.negative_cosine(a, b)),
    "barlow_twins": (losses.barlow_twins, lambda a, b: losses.barlow_twins(a, b)),
    "vicreg": (losses.vicreg, lambda a, b: losses.vicreg(a, b)),
    "matryoshka(nt_xent)": (losses.matryoshka,
                            losses.matryoshka(nt_xent_05, dims=(DIM // 4, DIM // 2, DIM))),
}
mix = jnp.roll(jnp.arange(BATCH), 1)  # m3co: the sample mixed into each row
hyperbolic = lambda x: losses.lorentz_expmap0(0.5 * losses.l2_normalize(x))  # points on the hyperboloid
tour.update({
    "albef_itc": (losses.albef_itc, lambda a, b: losses.albef_itc(a, b, a, b)),  # momentum towers = online
    "amcl": (losses.amcl, lambda a, b: losses.amcl(  # one head, a constant pair temperature 0.1
        a[:, None], b[:, None], jnp.full((1, 2 * BATCH, 2 * BATCH), 0.1))),
    "cacr": (losses.cacr, lambda a, b: losses.cacr(jnp.stack([a, b, z3]))),
    "ce_clip": (losses.ce_clip, lambda a, b: losses.ce_clip(  # two shifted captions as hard negatives
        a, b, jnp.stack([jnp.roll(b, 1, 0), jnp.roll(b, 2, 0)], 1)).loss),
    "contrastive_gap": (losses.contrastive_gap, lambda a, b: losses.contrastive_gap(a, b)),
    "decoupled_softmax": (losses.decoupled_softmax, lambda a, b: losses.decoupled_softmax(a, b)),
    "dual_view_moco": (losses.dual_view_moco, lambda a, b: losses.dual_view_moco(a, b, queue)),
    "entailment_cone": (losses.entailment_cone,
                        lambda a, b: losses.entailment_cone(hyperbolic(b), hyperbolic(a))),
    "filip": (losses.filip, lambda a, b: losses.filip(jnp.stack([a, z3], 1), jnp.stack([b, z3], 1))),
    "focal_clip": (losses.focal_clip, lambda a, b: losses.focal_clip(a, b, logit_scale=1 / 0.07)),
    "focal_supcon": (losses.focal_supcon, lambda a, b: losses.focal_supcon(jnp.stack([a, b], 1), labels)),
    "gated_pair_infonce": (losses.gated_pair_infonce,
                           lambda a, b: losses.gated_pair_infonce(a, b, jnp.full((DIM,), 0.5))),
    "gram": (losses.gram, lambda a, b: losses.gram(a, b, z3)),
    "hn_nce": (losses.hn_nce, lambda a, b: losses.hn_nce(a, b)),
    "isogclr": (losses.isogclr, lambda a, b: losses.isogclr(
        a, b, jnp.arange(BATCH), losses.isogclr_state(BATCH)).loss),
    "m3co": (losses.m3co, lambda a, b: losses.m3co(
        0.7 * a + 0.3 * a[mix], b, mix_index=mix, mix_weight=0.7)),
    "macl": (losses.macl, lambda a, b: losses.macl(a, b)),
    "matryoshka_2d(nt_xent)": (losses.matryoshka_2d, lambda a, b: losses.matryoshka_2d(
        nt_xent_05, layers=(0, 1), dims=(DIM // 2, DIM))(jnp.stack([z3, a]), jnp.stack([z3, b]))),
    "mcl_nt_xent": (losses.mcl_nt_xent, lambda a, b: losses.mcl_nt_xent(a, b, labels)),
    "meru": (losses.meru, lambda a, b: losses.meru(a, b)),
    "mlcd": (losses.mlcd, lambda a, b: losses.mlcd(a, centers, labels[:, None])),  # a against class centres
    "one_to_k_clip": (losses.one_to_k_clip,
                      lambda a, b: losses.one_to_k_clip(a, jnp.stack([b, z3]), logit_scale=1 / 0.07)),
    "poly_view": (losses.poly_view, lambda a, b: losses.poly_view(jnp.stack([a, b, z3]))),
    "positive_aware_infonce": (losses.positive_aware_infonce,
                               lambda a, b: losses.positive_aware_infonce(a, b)),
    "sbcl": (losses.sbcl, lambda a, b: losses.sbcl(jnp.stack([a, b], 1), labels, jnp.arange(BATCH) % 2)),
    "similarity_distillation": (losses.similarity_distillation,
                                lambda a, b: losses.similarity_distillation(a, b)),
    "snr_triplet": (losses.snr_triplet, lambda a, b: losses.snr_triplet(a, b, jnp.roll(b, 1, 0))),
    "softclip": (losses.softclip, lambda a, b: losses.softclip(a, b, a, b)),
    "spherical_z_contrastive": (losses.spherical_z_contrastive,
                                lambda a, b: losses.spherical_z_contrastive(a, b, a=1.0, b=1.0)),
    "spherical_z_loss": (losses.spherical_z_loss, lambda a, b: losses.spherical_z_loss(
        a @ centers.T, labels, a=1.0, b=1.0)),  # a classifier's logits against the class centres
    "starbucks(nt_xent)": (losses.starbucks, lambda a, b: losses.starbucks(
        nt_xent_05, pairs=((0, DIM // 2), (1, DIM)))(jnp.stack([z3, a]), jnp.stack([z3, b]))),
})

# Every loss and its gradient in one jitted function: one compile, called on both batches.
every = jax.jit(lambda a, b: {name: jax.value_and_grad(f)(a, b) for name, (_, f) in tour.items()})
aligned, shuffled_pairs = every(z1, z2), every(z1, z2[shuffled])
print(f"{'loss':<24}{'aligned':>10}{'shuffled':>10}{'|grad|':>10}   paper")
for name, (fn, _) in tour.items():
  (value, grad), (value_shuffled, _) = aligned[name], shuffled_pairs[name]
  print(f"{name:<24}{float(value):>10.4f}{float(value_shuffled):>10.4f}"
        f"{float(jnp.linalg.norm(grad)):>10.4f}   {paper(fn)[:70]}")

covered = {getattr(fn, "__name__", "") for fn, _ in tour.values()}
helpers = {"l2_normalize", "IsogclrState", "STARBUCKS_PAIRS", "filip_similarity",
           "gram_volume", "half_aperture", "exterior_angle", "isogclr_state", "lorentz_distance",
           "lorentz_expmap0", "mcl_cluster_ids", "snr_distance", "subclass_kmeans", "IsogclrOutput"}
missing = [n for n in losses.__all__ if n not in covered | helpers]
print("\nhelpers (not losses):", ", ".join(sorted(helpers & set(losses.__all__))))
print("losses in jaxcl.losses not in this tour:", missing or "none")

# %% [markdown]
# ## Temperature
#
# `s_ij = <z_i, z_j> / τ`. A small τ sharpens the softmax over the negatives: the loss concentrates on
# the few hardest negatives (right plot, one anchor's softmax weights over its negatives, sorted).
# The temperature can be a traced value, so one `vmap` evaluates a whole sweep.

# %%
taus = jnp.geomspace(0.02, 2.0, 30)
sweep = {}
for name, fn in (("nt_xent", losses.nt_xent), ("dcl", losses.dcl)):
  for pairs, b in (("aligned", z2), ("shuffled", z2[shuffled])):
    sweep[name, pairs] = jax.vmap(lambda t, fn=fn, b=b: fn(z1, b, temperature=t))(taus)

grad_norm = jax.vmap(lambda t: jnp.linalg.norm(jax.grad(
    lambda a: losses.nt_xent(a, z2, temperature=t))(z1)))(taus)

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for (name, pairs), values in sweep.items():
  axes[0].plot(taus, values, ls="-" if pairs == "aligned" else "--", label=f"{name}, {pairs}")
axes[0].set(xscale="log", xlabel="temperature τ", ylabel="loss", title="Loss against temperature")
axes[0].legend()
axes[1].plot(taus, grad_norm)
axes[1].set(xscale="log", yscale="log", xlabel="temperature τ", ylabel="‖∂L/∂z1‖",
            title="nt_xent gradient norm")
a, b = losses.l2_normalize(z1), losses.l2_normalize(z2)
sims = np.asarray(a[0] @ b.T)
negatives = np.sort(np.delete(sims, 0))[::-1]
for t in (0.05, 0.2, 1.0):
  w = np.exp((negatives - negatives.max()) / t)
  axes[2].plot(w / w.sum(), label=f"τ = {t}")
axes[2].set(xlabel="negatives of anchor 0, hardest first", ylabel="softmax weight",
            title="Where the gradient goes", xscale="log")
axes[2].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Logit scale and bias (CLIP, SigLIP)
#
# CLIP and SigLIP multiply the cosine similarities by a (learnable) logit scale instead of dividing by
# τ. SigLIP adds a bias b: with B² − B negative pairs against B positives, SigLIP starts at t = 10,
# b = −10 so that the initial predictions are mostly "negative".

# %%
scales = jnp.geomspace(1.0, 100.0, 30)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for pairs, b in (("aligned", z2), ("shuffled", z2[shuffled])):
  values = jax.vmap(lambda s, b=b: losses.clip(z1, b, logit_scale=s))(scales)
  axes[0].plot(scales, values, label=pairs)
axes[0].set(xscale="log", xlabel="logit scale", ylabel="clip loss", title="CLIP")
axes[0].legend()
biases = jnp.linspace(-40.0, 5.0, 46)
for scale in (1.0, 10.0, 30.0):
  values = jax.vmap(lambda bias, s=scale: losses.siglip(z1, z2, logit_scale=s, logit_bias=bias))(biases)
  axes[1].plot(biases, values, label=f"scale {scale:g}")
axes[1].set(xlabel="logit bias", ylabel="siglip loss", yscale="log", title="SigLIP (aligned pairs)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Engines side by side: the same numbers
#
# Every softmax / sigmoid-family loss is written against `jaxcl.ops.logsumexp` / `jaxcl.ops.sigmoid_sum`,
# so `impl=` swaps the engine underneath without touching the math. On a CPU runtime `pallas` runs in
# Pallas interpret mode (the same kernels, emulated).

# %%
impls = [i for i in ("dense", "blockwise", "pallas") if i in ops.available_impls()]
family = {
    "clip": lambda a, b, impl: losses.clip(a, b, logit_scale=1 / 0.07, impl=impl),
    "siglip": lambda a, b, impl: losses.siglip(a, b, logit_scale=10.0, logit_bias=-10.0, impl=impl),
    "nt_xent": lambda a, b, impl: losses.nt_xent(a, b, temperature=0.2, impl=impl),
    "supcon": lambda a, b, impl: losses.supcon(jnp.stack([a, b], 1), labels, temperature=0.1, impl=impl),
}
print(f"{'loss':<12}" + "".join(f"{i:>12}" for i in impls) + "   max |grad - dense grad|")
for name, f in family.items():
  results = {i: jax.jit(jax.value_and_grad(functools.partial(f, impl=i)))(z1, z2) for i in impls}
  dense_grad = results["dense"][1]
  diffs = [float(jnp.max(jnp.abs(results[i][1] - dense_grad))) for i in impls if i != "dense"]
  print(f"{name:<12}" + "".join(f"{float(results[i][0]):>12.6f}" for i in impls)
        + "   " + ", ".join(f"{d:.1e}" for d in diffs))


# %% [markdown]
# ## ... and different memory
#
# The compiled temporary memory of the CLIP loss's forward + backward pass (everything beyond the
# inputs and the gradients: `jax.jit(...).lower(...).compile().memory_analysis()`), against the batch
# size. `dense` holds the B×B similarity matrix and its gradient; `blockwise` holds one column tile at
# a time. Nothing is allocated here: the inputs are abstract shapes. `impl="auto"` picks `dense` while
# B² ≤ 4096², then `pallas` on GPU/TPU and `blockwise` elsewhere.

# %%
def clip_temp_bytes(batch, impl, dim=128):
  step = jax.jit(jax.value_and_grad(
      lambda a, b: losses.clip(a, b, logit_scale=1 / 0.07, impl=impl), argnums=(0, 1)))
  shape = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  return step.lower(shape, shape).compile().memory_analysis().temp_size_in_bytes

memory = {i: [clip_temp_bytes(b, i) for b in MEM_BATCHES] for i in impls}
print(f"{'B':>6} {'auto picks':>10}" + "".join(f"{i + ' MiB':>16}" for i in impls))
for n, b in enumerate(MEM_BATCHES):
  print(f"{b:>6} {ops.resolve_impl('auto', b, b):>10}"
        + "".join(f"{memory[i][n] / 2**20:>16.1f}" for i in impls))

fig, ax = plt.subplots(figsize=(6, 4))
for i in impls:
  ax.plot(MEM_BATCHES, np.array(memory[i]) / 2**20, marker="o", label=i)
ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="compiled temporaries (MiB)",
       title="CLIP forward + backward, D = 128")
ax.minorticks_off()
ax.set_xticks(MEM_BATCHES, [str(b) for b in MEM_BATCHES])
if jax.default_backend() == "cpu":
  ax.text(0.02, 0.02, "pallas: interpret mode on CPU", transform=ax.transAxes, fontsize=8)
ax.legend()
plt.show()
