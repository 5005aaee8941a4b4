"""Training methods as plug-ins: `config.method` names a registered `Method`.

Built in: simclr, dcl (`simclr.py`), supcon, multiview, moco, byol (`momentum.py`), nnclr, simsiam, swav, amcl
(AMCL's multi-head model and temperature network), csr (CSR's sparse autoencoder on a frozen backbone), the
image-text methods clip, siglip, lit (`image_text.py`), and the text-only simcse (`sentence.py`). A new method
is one file: a `Method` subclass (`base.py` says what each part does) registered with `register`, plus its
recipe in `configs/`.

>>> from jaxcl.train import methods
>>> methods.get("moco").name, methods.get("clip").image_text
('moco', True)
"""

from __future__ import annotations

from jaxcl.train.methods.base import (SHARDABLE_LOSSES, UNSEEN_LOG_U, VIEW_OUTPUTS, ImageModel, Method, ViewsMethod,
                                      build_encoder, check_loss_impl, config_sections, engine_options, fifo_enqueue,
                                      get, in_batch_accuracy, loss_impl, loss_log_u, names, register, section_owners,
                                      stored_log_u, unregister)

from jaxcl.train.methods import simclr, supcon, multiview, momentum, nnclr, simsiam, swav, image_text, amcl, csr, sentence  # noqa: E402,F401  registers

__all__ = ["Method", "ViewsMethod", "ImageModel", "register", "unregister", "get", "names", "SHARDABLE_LOSSES",
           "VIEW_OUTPUTS", "UNSEEN_LOG_U", "stored_log_u", "loss_log_u",
           "build_encoder", "check_loss_impl", "config_sections", "engine_options", "fifo_enqueue", "in_batch_accuracy",
           "loss_impl", "section_owners"]
