"""XLA GPU target specs (GpuTargetConfigProto text) of the GPUs `jaxcl.targets` compiles for.

XLA's own specs, less the `collective_memory_granularity` field that jaxlib 0.10 cannot parse.
"""
