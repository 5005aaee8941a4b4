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
# # SimCLR on the bundled handwritten digits
#
# "A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., 2020) with the
# jaxcl training system, on the 1,797 handwritten digits that scikit-learn ships (8×8 pixels, no
# download): train a ResNet-18 on two augmented views per image with NT-Xent, then evaluate the frozen
# encoder with kNN and a linear probe against two baselines (the same encoder at random init, and raw
# pixels), project the embeddings to 2-D and look at nearest neighbours.
#
# The settings are read from `configs/simclr_digits.py` (the command-line recipe; "a few minutes on a
# 2-core CPU" by its own account, faster on a GPU runtime).

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
# The recipe: `get_config()` of configs/<RECIPE>.py in your copy of the repository (a wheel does not
# include configs/). CONFIGS is that folder; left empty, it is looked for next to the installed jaxcl (an
# editable install, a clone on the path), in the working folder and the folders above it, then in the
# folders just below it (a clone in /content).
import glob
import importlib.util
import os

RECIPE = "simclr_digits"
CONFIGS = os.environ.get("JAXCL_NB_CONFIGS", "")


def find_configs(configs: str, recipe: str) -> str:
  """The folder that holds `<recipe>.py`: `configs` when given, else the first configs/ folder found."""
  if configs:
    candidates = [os.path.expanduser(configs)]
  else:
    here = os.getcwd()
    above = [here]
    while os.path.dirname(above[-1]) != above[-1]:
      above.append(os.path.dirname(above[-1]))
    candidates = [os.path.join(os.path.dirname(os.path.dirname(jaxcl.__file__)), "configs"),
                  *(os.path.join(folder, "configs") for folder in above),
                  *sorted(glob.glob(os.path.join(here, "*", "configs")))]
  for folder in candidates:
    if os.path.isfile(os.path.join(folder, f"{recipe}.py")):
      return folder
  raise FileNotFoundError(
      f"configs/{recipe}.py was not found in {candidates}: set CONFIGS (or JAXCL_NB_CONFIGS) to the "
      "configs folder of your copy of the repository.")


def load_recipe(path: str):
  """`get_config()` of the recipe file at `path`: a new ConfigDict at every call."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jaxcl_recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


RECIPE_PATH = os.path.join(find_configs(CONFIGS, RECIPE), f"{RECIPE}.py")
recipe = load_recipe(RECIPE_PATH)
print("recipe:", RECIPE_PATH)

# %%
# Parameters: the recipe's values unless set here (the tests shrink them with JAXCL_NB_* environment variables).
STEPS = int(os.environ.get("JAXCL_NB_STEPS", recipe.total_steps))
BATCH = int(os.environ.get("JAXCL_NB_BATCH", recipe.batch_size))
ENCODER = os.environ.get("JAXCL_NB_ENCODER", recipe.model.encoder)  # a jaxcl.models.build_model name ("mlp": fast)
WIDTH = int(os.environ.get("JAXCL_NB_WIDTH", recipe.model.width))  # ResNet base width
KNN_K = int(os.environ.get("JAXCL_NB_KNN_K", recipe.eval.knn_k))
TSNE_ITERS = int(os.environ.get("JAXCL_NB_TSNE_ITERS", 1000))  # t-SNE iterations (>= 250)
DATA_DIR = os.environ.get("JAXCL_NB_DATA_DIR", recipe.data.data_dir)  # the digits are written here once
WORKDIR = os.environ.get("JAXCL_NB_WORKDIR", "runs/simclr_digits")  # checkpoints, metrics, plots

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxcl.data import augment, pipeline, sources
from jaxcl.train import checkpoints, devices, evaluation, loop
from jaxcl.train import state as state_lib
from jaxcl.train import metrics as metrics_lib

print("devices:", jax.devices())

# %% [markdown]
# ## The recipe
#
# A method is configuration, not a trainer: `base_config()` holds every key (a typo is an error), the
# recipe sets the SimCLR values. The parameters above go on top; for a run of another length, the
# checkpoint, evaluation and log intervals scale with it and the warmup is at most a tenth of it.

# %%
config = load_recipe(RECIPE_PATH)
config.warmup_steps = max(1, min(config.warmup_steps, STEPS // 10))  # at most a tenth of the run
for key in ("checkpoint_every", "eval_every", "log_every"):  # in proportion to the run's length
  config[key] = max(1, config[key] * STEPS // config.total_steps)
config.total_steps = STEPS
config.batch_size = BATCH
config.model.encoder = ENCODER
config.model.width = WIDTH
config.eval.knn_k = KNN_K
config.data.data_dir = DATA_DIR
print(config)

# %% [markdown]
# ## The data and the two views
#
# `load_arrays` reads a whole split into memory; training reads it through a grain loader. The
# augmentations (random resized crop, brightness/contrast jitter, blur) run on the device, one key per
# example.

# %%
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

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `python -m jaxcl.main --config=configs/simclr_digits.py --workdir=DIR`
# runs: a sharded `jit` step, orbax checkpoints, metrics, evaluation. Running the cell again on the same
# `WORKDIR` resumes from its last checkpoint (here: it finds the finished run and only re-evaluates).

# %%
results = loop.train_and_evaluate(config, WORKDIR)

# %% [markdown]
# ## kNN and linear probe against the baselines

# %%
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

# %% [markdown]
# ## The trained encoder
#
# Restore the final checkpoint (parameters, batch statistics, optimizer state and data iterator, as a
# resumed run would) and embed both splits with the backbone (the representation before the projection
# head, which is what kNN and the linear probe evaluated).

# %%
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

# %% [markdown]
# ## Embedding projection
#
# PCA and t-SNE of the held-out digits' features, coloured by the label the encoder never saw.

# %%
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


# %% [markdown]
# ## Nearest neighbours
#
# For some held-out digits (left column), the five most similar training digits by cosine similarity
# of the SimCLR features, and by raw pixels. A green title is a neighbour with the query's label.

# %%
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
