"""The XLA flags dsjax sets by default, per jaxlib version.

XLA aborts the whole process on a flag it does not know ("Unknown flag in XLA_FLAGS"), and flags come and
go between jaxlib releases, so the set is an allow-list keyed by jaxlib's major.minor version: a version
with no entry gets no flags (and a note in the log). Each entry's flags are parsed by the installed jaxlib
in tests/test_xla_flags.py, and each flag is kept only with a measured gain recorded in
experiments/RESULTS.md.

`apply()` must run before JAX initialises its backends (XLA reads XLA_FLAGS once, then); `python -m
dsjax.train` and the benchmarks call it first thing. Flags the user already set in XLA_FLAGS win.
"""

from __future__ import annotations

import os
import re

import jaxlib

# jaxlib major.minor -> {flag: value}. GPU flags are parsed (and ignored) by the CPU backend too.
#
# Adopted for 0.11 (experiments/RESULTS.md, 2026-11-28, jaxlib 0.11.2, 4x H200):
#   --xla_gpu_all_reduce_combine_threshold_bytes=268435456  XLA combines the gradient all-reduces of data
#     parallelism into buckets of up to 256 MiB rather than XLA's default size: llama-1b data 4 271.1 -> 263.1 ms and
#     266.8 -> 264.7 ms (two machines), data 2 263.4 -> 261.3 ms; 64 MiB and 1 GiB measured the same as 256.
# Measured and not adopted (experiments/RESULTS.md, 2026-11-28, jaxlib 0.11.2 on H100/H200):
#   --xla_gpu_enable_triton_gemm=false             gpt2-124m 2% and llama-1b 8% slower (one H100)
#   --xla_gpu_enable_latency_hiding_scheduler=true llama-1b FSDP on 4 and 2 GPUs within 0.2% (already on)
#   --xla_gpu_enable_cublaslt=true                 gpt2-124m batch 32 within 0.1% (one H200)
#   --xla_gpu_enable_cudnn_layer_norm=true         gpt2-124m batch 32 0.8% slower (one H200)
#   --xla_gpu_experimental_enable_triton_heroless_priority_fusion=true, ..._enable_fusion_block_level_rewriter=true,
#   --xla_gpu_unsupported_enable_triton_multi_output_fusion=true   gpt2-124m batch 32 0.9%, 1.7% slower, same (H200)
#   --xla_gpu_use_memcpy_local_p2p=true           llama-1b pipeline 2 batch 32: circular 1.0% faster, 1F1B
#     0.1%, within machine noise (2x H200, 2026-11-29)
#   --xla_gpu_triton_gemm_any=true                gpt2-124m batch 32, bf16 and fp16: means within 0.3% (H200,
#     2026-11-30)
#   --xla_gpu_memory_limit_slop_factor=50         llama-1b pipeline 2 batch 32 unrolled: 4.6-6.3 GiB less, 0.7-1.3%
#     slower (2x H200, 2026-11-30); the memory preflight names it when train.memory_budget_gb is below the GPU
#     allocator's limit
#   --xla_gpu_enable_command_buffer=              (CUDA graphs off) gpt2-124m batch 32 1.4% slower (H200, 2026-11-30)
# Parsed by jaxlib 0.11.2 but not measured: the pipelined all-gather / reduce-scatter / all-reduce
# switches, the all-gather and reduce-scatter combine thresholds, while-loop double buffering and the
# highest-priority async stream. Removed by 0.11 (an abort if set):
# xla_gpu_graph_level, xla_gpu_enable_async_all_gather.
# An empty entry is a validated "no flags": dsjax's defaults there are XLA's own.
FLAGS: dict[str, dict[str, str]] = {
    "0.10": {},
    "0.11": {"xla_gpu_all_reduce_combine_threshold_bytes": "268435456"},
}


def version_key(version: str = jaxlib.__version__) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{minor}"


def recommended(version: str = jaxlib.__version__) -> dict[str, str] | None:
    """dsjax's flags for this jaxlib version; None when the version has no validated entry."""
    return FLAGS.get(version_key(version))


def merge(existing: str, flags: dict[str, str]) -> str:
    """`existing` XLA_FLAGS plus those of `flags` it does not name already (the user's settings win)."""
    named = set(re.findall(r"--([A-Za-z0-9_]+)", existing))
    extra = [f"--{name}={value}" for name, value in flags.items() if name not in named]
    return " ".join([existing.strip(), *extra]).strip()


def apply(environ: os._Environ | dict | None = None) -> str:
    """Add dsjax's flags for the installed jaxlib to XLA_FLAGS. Returns a one-line account for the log, or
    "" when there is nothing to say (the installed jaxlib's entry is empty)."""
    environ = os.environ if environ is None else environ
    from jax._src import xla_bridge

    flags = recommended()
    if flags is None:
        return (
            f"XLA flags: none set by dsjax (jaxlib {jaxlib.__version__} has no validated entry in "
            "dsjax.xla_flags.FLAGS)."
        )
    if not flags:
        return ""
    if xla_bridge.backends_are_initialized():
        return "XLA flags: JAX's backends are already initialised, so dsjax's flags were not applied."
    environ["XLA_FLAGS"] = merge(environ.get("XLA_FLAGS", ""), flags)
    return f"XLA flags: {environ['XLA_FLAGS']}"


# Share of each GPU's memory JAX's allocator may take when the user has not chosen one. JAX's own default
# is 0.75; 0.9 leaves about 8 GiB of an 80 GiB card to cuDNN, cuBLAS and NCCL outside the pool and lets
# llama-1b train at --train.batch_size=12 (58.6 GiB compiled step), where it measured 56.0% MFU on one
# H100 against 55.0% at the preset's batch 8 (experiments/RESULTS.md).
MEM_FRACTION = "0.9"


def default_memory_fraction(environ: os._Environ | dict | None = None) -> None:
    """Set XLA_PYTHON_CLIENT_MEM_FRACTION to MEM_FRACTION unless the user set it or JAX is already up
    (the allocator reads it once, when the GPU backend starts)."""
    environ = os.environ if environ is None else environ
    from jax._src import xla_bridge

    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in environ and not xla_bridge.backends_are_initialized():
        environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = MEM_FRACTION
