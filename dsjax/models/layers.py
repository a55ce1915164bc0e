"""Building blocks shared by the decoder families: parameter specs, stacked layers, norms, RoPE, attention.

Shapes use fixed capitals: B batch, T sequence, D embed, N query heads, K kv heads, H head dim,
F mlp, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ConfigError, ModelConfig

INITS = ("normal", "residual", "ones", "zeros")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axis names and initializer of one parameter (per layer, before stacking)."""

    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    init: str = "normal"  # 'normal' (std), 'residual' (std / sqrt(2L), GPT-2), 'ones', 'zeros'


def make_param(
    spec: ParamSpec, cfg: ModelConfig, key: jax.Array, n_stack: int | None = None, dtype=jnp.float32
) -> nnx.Param:
    """An nnx.Param of `dtype` initialised per `spec` (drawn in fp32), optionally stacked on a leading
    'layers' axis."""
    shape = spec.shape if n_stack is None else (n_stack, *spec.shape)
    logical = spec.logical if n_stack is None else ("layers", *spec.logical)
    if spec.init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif spec.init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        std = cfg.init_std / (math.sqrt(2 * cfg.n_layers) if spec.init == "residual" else 1.0)
        value = std * jax.random.normal(key, shape, jnp.float32)
    # Randomly initialised tensors are weights and take weight decay; norms and biases do not.
    return nnx.Param(value.astype(dtype), logical=logical, decay=spec.init in ("normal", "residual"))


class Group(nnx.Module):
    """Named parameters built from specs. With `stacked=True`, L copies stacked on a leading 'layers'
    axis, so one block can be scanned (one compiled body for all layers) and later split into pipeline
    stages."""

    def __init__(
        self, specs: dict[str, ParamSpec], cfg: ModelConfig, *, rngs: nnx.Rngs, stacked: bool, dtype=jnp.float32
    ):
        self.names = tuple(specs)
        for name, spec in specs.items():
            n_stack = cfg.n_layers if stacked else None
            setattr(self, name, make_param(spec, cfg, rngs.params(), n_stack=n_stack, dtype=dtype))

    def arrays(self) -> dict[str, jax.Array]:
        """{name: array}; for a stacked group each array has the leading (L,) axis, the scan operand."""
        return {name: getattr(self, name).get_value() for name in self.names}


def sharding_platform(sharding: jax.sharding.NamedSharding | None) -> str:
    """The platform of the devices an array with `sharding` lives on (the default backend without one)."""
    return next(iter(sharding.mesh.devices.flat)).platform if sharding is not None else jax.default_backend()


@functools.cache
def triton_available() -> bool:
    """Whether this jax has Pallas's Triton backend, which the norm, GELU, q/k/v and Triton loss kernels are
    written for. jax 0.11 deprecated it for removal; without it their 'auto' settings take XLA."""
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        return False
    return hasattr(plgpu, "CompilerParams")


def check_triton(field: str) -> None:
    """ConfigError for model.FIELD='pallas' (a Pallas Triton kernel) where this jax cannot run it."""
    if not triton_available():
        raise ConfigError(
            f"model.{field}='pallas' is a Pallas kernel on Pallas's Triton backend, which jax {jax.__version__} "
            f"does not have (jax 0.11 deprecated it); use model.{field}=auto, which takes XLA's fusions instead."
        )


def splits_last_axis(sharding: jax.sharding.NamedSharding | None) -> bool:
    """Whether a (B, T, X) activation with `sharding` has its last axis split over devices (the vocabulary
    of the logits, the features of the residual stream): kernels that need whole rows cannot take it."""
    return sharding is not None and len(sharding.spec) >= 3 and sharding.spec[2] is not None


def activation_spec(sharding: jax.sharding.NamedSharding) -> tuple:
    """The PartitionSpec entries of a (B, T, X) activation with `sharding`, padded with None to three."""
    return tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))


def row_axes(spec: tuple) -> tuple[str, ...]:
    """The mesh axes that split the rows (the B and T axes) of an activation laid out as `spec`: a
    per-device kernel's sums over rows are summed over these."""
    return tuple(a for part in spec[:2] if part is not None for a in ((part,) if isinstance(part, str) else part))


def as_rows(a: jax.Array) -> jax.Array:
    """(..., X) -> (rows, X), the layout the row-wise kernels take."""
    return a.reshape(-1, a.shape[-1])


def row_tiles_with_column_sums(
    kernel, operands, out: jax.ShapeDtypeStruct, sum_cols: int, *, block_rows: int, block_cols: int,
    max_programs: int, warps: int, name: str, interpret: bool,
):  # fmt: skip
    """One Pallas (Triton) call of a backward kernel over row tiles that also sums columns: a grid of (programs,
    column blocks of `block_cols` over the first operand's columns), each program looping over every
    programs-th tile of `block_rows` rows (at most `max_programs` per column block). `kernel(*in_refs, out_ref,
    sums_ref, programs=...)` writes `out` and its programs' partial column sums (programs, sum_cols) in fp32,
    added up here. -> (out, the column sums (sum_cols,) fp32)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols = operands[0].shape
    programs = min(max_programs, pl.cdiv(rows, block_rows))
    result, sums = pl.pallas_call(
        functools.partial(kernel, programs=programs),
        grid=(programs, pl.cdiv(cols, block_cols)),
        out_shape=[out, jax.ShapeDtypeStruct((programs, sum_cols), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*operands)
    return result, sums.sum(0)


def cast(params: dict, dtype, keep: tuple[str, ...] = ()) -> dict:
    """A layer's parameters in the compute dtype, except those named in `keep` (norm parameters, which
    the norms use in fp32: rounding them to bf16 first would throw the master precision away) and those
    already cast (`Precast`)."""
    return {
        name: value if name in keep or isinstance(value, Precast) else value.astype(dtype)
        for name, value in params.items()
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Precast:
    """A matmul weight `master` (fp32) and its cast to the compute dtype, `compute`, made once before a loop
    that runs the blocks many times (a pipeline's ticks). `project` computes with `compute` and returns the
    weight's gradient to `master`, in master's dtype straight from the GEMM (see `project`)."""

    master: jax.Array
    compute: jax.Array


def recomputed(fn):
    """`fn` differentiated with its arguments as its only residuals: the backward pass evaluates `fn` again,
    behind an optimization barrier on those arguments.

    Without the barrier XLA may merge the backward pass's recomputation with the forward pass's and keep
    the forward pass's intermediates alive until the backward pass reads them, which is what the custom
    VJP exists to avoid (gpt2's GELU, `dsjax.models.gelu`; llama's SwiGLU in fp16, `dsjax.models.llama`;
    experiments/RESULTS.md). Same arithmetic as autodiff of `fn`."""

    @jax.custom_vjp
    def f(*args):
        return fn(*args)

    def f_fwd(*args):
        return fn(*args), args

    def f_bwd(args, g):
        _, vjp = jax.vjp(fn, *jax.lax.optimization_barrier(args))
        return vjp(g)

    f.defvjp(f_fwd, f_bwd)
    return functools.wraps(fn)(f)


def project(spec: str, x: jax.Array, w: jax.Array | Precast) -> jax.Array:
    """einsum(spec, x, w) of activations x and a weight w, in x's dtype (`spec`: "lhs,rhs->out", every index
    of the weight in x or in the output).

    For a plain array this is the einsum, differentiated as usual. For a `Precast` weight the GEMM of the
    weight's gradient writes it in master's dtype (fp32), accumulated in fp32 and never rounded to the
    compute dtype. A loop that sums per-microbatch gradients into fp32 accumulators (the pipeline
    schedules) then adds the GEMM's own output; where the add takes it directly (unrolled layers), XLA folds
    the add into the GEMM (cuBLAS with beta = 1, Megatron's gradient-accumulation fusion) instead of writing
    a bf16 gradient and converting and adding it in a separate pass (experiments/RESULTS.md). With scanned
    layers the gradients reach the accumulators through the scan's stacked output, still in fp32."""
    if isinstance(w, Precast):
        return _project_precast(spec, x, w.master, jax.lax.stop_gradient(w.compute))
    return jnp.einsum(spec, x, w)


def einsum_sides(spec: str) -> tuple[str, str, str]:
    """ "lhs,rhs->out" -> (lhs, rhs, out)."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project_precast(spec: str, x: jax.Array, master: jax.Array, compute: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, compute)


def _project_precast_fwd(spec, x, master, compute):
    return jnp.einsum(spec, x, compute), (x, compute, jnp.zeros((), master.dtype))


def weight_grad(spec: str, x: jax.Array, g: jax.Array, dtype) -> jax.Array:
    """The gradient of w in einsum(spec, x, w) for the output's cotangent g, written by the GEMM in `dtype`."""
    lhs, rhs, out = einsum_sides(spec)
    return jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=dtype)


def _project_precast_bwd(spec, residuals, g):
    x, compute, master_dtype = residuals
    lhs, rhs, out = einsum_sides(spec)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, compute)
    return dx, weight_grad(spec, x, g, master_dtype.dtype), None


_project_precast.defvjp(_project_precast_fwd, _project_precast_bwd)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form). x (B, T, N, H), positions (T,) -> (B, T, N, H)."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # (T, H/2)
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supports(platform: str, dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: GPUs, bf16/fp16, head dim a multiple of 8 and at most 128."""
    half = jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]
    return platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128


def attention_impl(setting: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """Resolve model.attention: 'auto' takes cuDNN's fused kernel where it supports the platform, dtype
    and head dim, and XLA's implementation elsewhere (CPU, fp32). `jax.nn.dot_product_attention` itself
    defaults to XLA, so the choice is made here. An explicit 'cudnn' that cannot run is a ConfigError."""
    platform = platform or jax.default_backend()
    if setting == "auto":
        return "cudnn" if cudnn_supports(platform, dtype, head_dim) else "xla"
    if setting == "cudnn" and not cudnn_supports(platform, dtype, head_dim):
        raise ConfigError(
            f"model.attention='cudnn' needs a GPU, bf16 or fp16 compute and a head dim that is a multiple of 8 "
            f"and at most 128; this run has platform {platform}, compute {jnp.dtype(dtype).name}, head dim "
            f"{head_dim}. Use model.attention=auto or xla."
        )
    return setting


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
    """q (B, T, N, H), k and v (B, T, K, H) with N a multiple of K (grouped-query) -> (B, T, N, H).

    `impl` is 'xla' or 'cudnn', as `attention_impl` resolved it for this call's devices.
    """
    if impl == "xla" and q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA's CPU backend has no fp16 x fp16 -> fp32 dot, which the XLA attention path asks for; run it
        # in fp32 there (CPU runs are for correctness, not speed).
        out = jax.nn.dot_product_attention(
            *(a.astype(jnp.float32) for a in (q, k, v)), is_causal=True, implementation=impl
        )
        return out.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
