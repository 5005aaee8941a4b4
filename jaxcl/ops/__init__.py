"""Similarity engines: the reductions over S = scale · q kᵀ that every loss is built on."""

from jaxcl.ops import sharded  # allgather / ring engines under shard_map (imports every engine)
from jaxcl.ops.engines import (
    BY_PLATFORM,
    DENSE_MAX_ELEMENTS,
    available_impls,
    register_engine,
    resolve_impl,
)
from jaxcl.ops.masks import diagonal
from jaxcl.ops.reductions import (
    LogSumExp,
    Nearest,
    logsumexp,
    nearest,
    sigmoid_sum,
    top1,
    Top1,
)

__all__ = [
    "sharded",
    "BY_PLATFORM",
    "DENSE_MAX_ELEMENTS",
    "LogSumExp",
    "available_impls",
    "diagonal",
    "logsumexp",
    "nearest",
    "Nearest",
    "register_engine",
    "resolve_impl",
    "sigmoid_sum",
    "top1",
    "Top1",
]
