"""Tests of jaxcl/losses/__init__.py."""


from jaxcl import losses
import jaxcl


def test_package_exports():
  assert jaxcl.losses.infonce is losses.infonce
  for name in losses.__all__:
    if not name.isupper():  # constants such as STARBUCKS_PAIRS
      assert callable(getattr(losses, name)), name


# Public names of jaxcl.losses that are not losses (geometry, similarities, encoders, state, wrappers
# that forward **kwargs), so take no `reduction` / `mask`.
NOT_LOSSES = {"catlip_targets", "exterior_angle", "filip_similarity", "gram_negatives", "gram_volume", "half_aperture",
              "isogclr_state",
              "isogclr_clip_state",
              "l2_normalize", "lorentz_distance", "lorentz_expmap0", "matryoshka", "matryoshka_2d",
              "mcl_cluster_ids", "retrieval_accuracy", "sae_decode", "sae_encode", "sae_pre_activation",
              "sinkhorn_knopp", "snr_distance", "starbucks", "subclass_kmeans", "topk_activation", "topk_mask"}


def test_every_loss_takes_reduction_and_mask():
  import inspect  # noqa: PLC0415

  functions = {n: getattr(losses, n) for n in losses.__all__
               if inspect.isfunction(getattr(losses, n)) or inspect.isfunction(getattr(getattr(losses, n), "__wrapped__", None))}
  missing = [n for n, f in functions.items() if n not in NOT_LOSSES
             and not {"reduction", "mask"} <= set(inspect.signature(f).parameters)]
  assert not missing, f"losses without reduction= / mask=: {missing}"
  assert NOT_LOSSES <= set(functions), NOT_LOSSES - set(functions)


def test_every_loss_with_an_engine_runs_on_a_mesh():
  """A loss that takes `impl=` takes `axis_name=` and `mesh=` too ("Sharded batches" in jaxcl.losses),
  and the docstring's list of them names it."""
  import inspect  # noqa: PLC0415

  with_impl = [n for n in losses.__all__ if callable(getattr(losses, n)) and not inspect.isclass(getattr(losses, n))
               and "impl" in inspect.signature(getattr(losses, n)).parameters]
  missing = [n for n in with_impl if not {"axis_name", "mesh"} <= set(inspect.signature(getattr(losses, n)).parameters)]
  assert not missing, f"losses with impl= but without axis_name= / mesh=: {missing}"
  import re  # noqa: PLC0415

  listed = set(re.findall(r"\w+", losses.__doc__[losses.__doc__.index("Sharded batches."):].split("- inside your own")[0]))
  unlisted = [n for n in with_impl if n != "retrieval_accuracy" and n not in listed]
  assert not unlisted, f"add {unlisted} to 'Sharded batches' in jaxcl/losses/__init__.py"
