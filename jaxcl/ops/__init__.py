"""Similarity engines: the reductions over S = scale · q kᵀ that every loss is built on."""

from jaxcl.ops.masks import diagonal
from jaxcl.ops.reductions import (
    BY_PLATFORM,
    DENSE_MAX_ELEMENTS,
    LogSumExp,
    available_impls,
    logsumexp,
    register_engine,
    resolve_impl,
    sigmoid_sum,
    top1,
    Top1,
)

__all__ = [
    "sharded",
    "DENSE_MAX_ELEMENTS",
    "LogSumExp",
    "available_impls",
    "diagonal",
    "logsumexp",
    "register_engine",
    "resolve_impl",
    "sigmoid_sum",
    "top1",
    "Top1",
]

# Importing an engine module registers it for `impl=`.
from jaxcl.ops import pallas as _pallas  # noqa: E402,F401  (fused kernels; interpret mode on CPU)
from jaxcl.ops import blockwise as _blockwise  # noqa: E402,F401  (pure-JAX tiles, custom VJP)
from jaxcl.ops import sharded  # noqa: E402  (allgather / ring engines under shard_map)
