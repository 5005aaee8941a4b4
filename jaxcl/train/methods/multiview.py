"""Multi-view contrastive learning: `config.num_views` >= 2 views of each image.

Losses: `multiview_infonce` ("Contrastive Multiview Coding", Tian et al., 2020: every pair of views),
`mv_dhel` (decoupled hyperspherical energy loss over the views), and `pairwise_nt_xent` (the average of
NT-Xent over all view pairs).
"""

from __future__ import annotations

from jaxcl import losses
from jaxcl.train.methods import base

MULTIVIEW_LOSSES = {"multiview_infonce": losses.multiview_infonce, "mv_dhel": losses.mv_dhel}


class Multiview(base.ViewsMethod):
  name = "multiview"
  loss_names = tuple(MULTIVIEW_LOSSES) + ("pairwise_nt_xent",)
  num_views = None  # any number >= 2

  def loss(self, config, outputs, batch, state, *, mesh=None, forward=None):
    z, t = outputs["projection"], config.loss.temperature
    engine = base.engine_options(config, mesh)  # (V, B, D) views: the losses split them along B
    if config.loss.name == "pairwise_nt_xent":
      v = z.shape[0]
      pairs = [(i, j) for i in range(v) for j in range(i + 1, v)]
      return sum(losses.nt_xent(z[i], z[j], temperature=t, **engine) for i, j in pairs) / len(pairs), state, {}
    return MULTIVIEW_LOSSES[config.loss.name](z, temperature=t, **engine), state, {}


base.register(Multiview())
