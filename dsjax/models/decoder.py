"""The decoder-only language model shared by all families: embeddings, scanned blocks, final norm, LM head.

A family module (llama.py, gpt2.py) supplies `block_params`, `block`, `norm_params`, `final_norm`,
`LEARNED_POSITIONS`, `KEEP` (the block parameters its block does not cast to the compute dtype) and
`PROJECTIONS` (the block weights it uses only through `layers.project`); everything else is common.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import pipeline
from dsjax.config import ModelConfig, PipelineConfig
from dsjax.models import gpt2, llama, xent
from dsjax.models.layers import Group, ParamSpec, Precast, attention_impl, cast, make_param, weight_grad
from dsjax.precision import POLICIES, Policy, compute_dtype
from dsjax.remat import scan_layers
from dsjax.sharding import constrain, logical_axes, named

FAMILIES = {"llama": llama, "gpt2": gpt2}


class Decoder(nnx.Module):
    """tokens (B, T) int32 -> logits (B, T, V) in the policy's output dtype.

    `policy` sets the parameter dtype and the default compute dtype (an enclosing `dsjax.amp.autocast`
    overrides the latter); `remat_policy` / `remat_every` / `remat_prevent_cse` choose activation
    rematerialisation over the scanned layers (see dsjax.remat).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        policy: Policy = POLICIES["fp32"],
        remat_policy: str = "none",
        remat_every: int = 1,
        remat_prevent_cse: bool = False,
        pipeline: PipelineConfig | None = None,
    ):
        self.cfg, self.policy, self.remat_policy, self.remat_every = cfg, policy, remat_policy, remat_every
        self.remat_prevent_cse = remat_prevent_cse
        self.pipeline = pipeline or PipelineConfig()
        family = FAMILIES[cfg.family]
        D, V, dtype = cfg.d_model, cfg.vocab_size, policy.param
        self.embed = make_param(ParamSpec((V, D), ("vocab", "embed")), cfg, rngs.params(), dtype=dtype)
        if family.LEARNED_POSITIONS:
            spec = ParamSpec((cfg.max_seq_len, D), (None, "embed"))
            self.positions = make_param(spec, cfg, rngs.params(), dtype=dtype)
        self.blocks = Group(family.block_params(cfg), cfg, rngs=rngs, stacked=True, dtype=dtype)
        self.final_norm = Group(family.norm_params(cfg), cfg, rngs=rngs, stacked=False, dtype=dtype)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(ParamSpec((D, V), ("embed", "vocab")), cfg, rngs.params(), dtype=dtype)

    def __call__(self, tokens: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        return self.project(self.features(tokens, mesh), self.head(), mesh)

    def features(self, tokens: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """tokens (B, T) -> final-norm hidden states (B, T, D) in the compute dtype."""
        x = self.embed_tokens(tokens, mesh)
        plan = self.plan(mesh, x.shape[0])
        stage = self.stage_fn(tokens.shape[1], mesh, vmapped=plan is not None)
        if plan is None:
            x = stage(self.blocks.arrays(), x)
        else:
            weights, logical = self.blocks.arrays(), self.block_logical()
            cast, per_layer = self.compute_weights, not self.cfg.scan_layers
            x = pipeline.run(stage, x, weights, logical, plan, mesh, cast=cast, per_layer=per_layer)
        return self.final_norm_fn(x, mesh)

    def embed_tokens(self, tokens: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """tokens (B, T) -> embeddings (plus learned positions) (B, T, D) in the compute dtype."""
        dtype = compute_dtype(self.policy.compute)
        T = tokens.shape[1]
        # Gather the table's FSDP shards first (ZeRO-3 does this for every weight before use); a gather from
        # a table split along D by the same axis that splits the batch would force a full replication.
        table = constrain(self.embed.get_value(), ("vocab", None), mesh)
        x = jnp.take(table, tokens, axis=0).astype(dtype)  # (B, T, D)
        if FAMILIES[self.cfg.family].LEARNED_POSITIONS:
            x = x + self.positions.get_value()[None, :T].astype(dtype)
        return constrain(x, ("act_batch", "act_seq", "act_embed"), mesh)

    def stage_fn(self, seq_len: int, mesh: jax.sharding.Mesh | None = None, vmapped: bool = False):
        """stage(layers {name: (n, ...)}, x (B, T, D)) -> x after those n layers, with the model's remat
        policy: all layers, or one pipeline chunk. `vmapped`: the caller differentiates it under a vmap
        over the stages (GPipe, circular), which the remat policy must know (`remat.policy_for`)."""
        cfg = self.cfg
        family = FAMILIES[cfg.family]
        dtype = compute_dtype(self.policy.compute)
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        # Resolve 'auto' once, for the devices this call runs on, and hand the blocks the concrete choice.
        cfg = dataclasses.replace(cfg, attention=attention_impl(cfg.attention, dtype, cfg.head_dim, platform))
        positions = jnp.arange(seq_len, dtype=jnp.int32)

        def block(layer_params, x):
            return family.block(layer_params, x, positions, cfg, mesh)

        def stage(layers, x):
            policy, every, unroll = self.remat_policy, self.remat_every, not cfg.scan_layers
            return scan_layers(
                block, x, layers, policy, every, unroll=unroll, batch_dims=int(vmapped),
                prevent_cse=self.remat_prevent_cse,
            )  # fmt: skip

        return stage

    def compute_weights(self, stacked: dict[str, jax.Array]) -> dict:
        """Block weights ({name: (..., )}) as the blocks use them: in the compute dtype, except the
        parameters the family keeps in their own (the norms). Casting once, before a loop that runs the
        blocks many times (the pipeline's ticks), keeps the loop from casting them at every iteration. The
        matmul weights come as `Precast` (the weight and its cast) where the cast changes the dtype, so that
        their gradients leave the GEMMs in the weight's dtype (`layers.project`)."""
        family = FAMILIES[self.cfg.family]
        dtype = compute_dtype(self.policy.compute)
        cast_weights = cast(stacked, dtype, keep=family.KEEP)
        return {
            name: Precast(stacked[name], w) if name in family.PROJECTIONS and w.dtype != stacked[name].dtype else w
            for name, w in cast_weights.items()
        }

    def final_norm_fn(self, x: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        return FAMILIES[self.cfg.family].final_norm(x, self.final_norm.arrays(), self.cfg, mesh)

    def block_logical(self) -> dict[str, tuple]:
        return {name: logical_axes(getattr(self.blocks, name)) for name in self.blocks.names}

    def plan(self, mesh: jax.sharding.Mesh | None, batch: int) -> pipeline.Plan | None:
        """The pipeline plan for a batch of `batch` sequences on `mesh` (its `pipeline` axis is the stage
        count); None without pipelining, or for a batch the microbatches cannot split (sampling one
        sequence), which then runs the layers in order, their weights gathered from the stages."""
        stages = 1 if mesh is None else mesh.shape.get("pipeline", 1)
        if stages == 1:
            return None
        plan = pipeline.Plan.of(self.pipeline, stages)
        shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        return None if batch % (plan.microbatches * shards) else plan

    def head(self) -> jax.Array:
        """The LM head matrix: (V, D) when tied to the embedding, else (D, V)."""
        return self.embed.get_value() if self.cfg.tie_embeddings else self.lm_head.get_value()

    def head_spec(self) -> str:
        return "BTD,VD->BTV" if self.cfg.tie_embeddings else "BTD,DV->BTV"

    def token_losses(
        self,
        x: jax.Array,
        head: jax.Array | Precast,
        labels: jax.Array,
        mesh: jax.sharding.Mesh | None = None,
        kernel: str | None = None,
    ) -> jax.Array:
        """Next-token cross-entropy (nats, fp32) at every position: hidden states x (B, T, D), labels (B, T)
        -> (B, T). Equal to the softmax cross-entropy of `project`'s logits, computed by `head_cross_entropy`
        (one fused LM head + loss with a hand-written backward pass); `kernel` overrides model.loss_kernel."""
        logits_shape = (*x.shape[:2], self.cfg.vocab_size)
        sharding = None if mesh is None else named(("act_batch", "act_seq", "act_vocab"), logits_shape, mesh)
        out = jnp.dtype(self.policy.output)
        kernel = kernel or self.cfg.loss_kernel
        w = head if isinstance(head, Precast) else head.astype(x.dtype)
        return head_cross_entropy(x, w, labels, self.head_spec(), out, sharding, kernel)

    def project(self, x: jax.Array, head: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """Hidden states (B, T, D) -> logits (B, T, V) in the output dtype. A pure function of its arguments,
        so a chunked loss can call it inside scan and checkpoint."""
        logits = head_matmul(x, head.astype(x.dtype), self.head_spec(), jnp.dtype(self.policy.output))
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"), mesh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def head_matmul(x: jax.Array, w: jax.Array, spec: str, out_dtype: jnp.dtype) -> jax.Array:
    """The LM head: einsum(spec, x, w) accumulated in fp32 and returned in `out_dtype`, whose backward pass
    runs in the compute dtype (x's).

    Differentiating an fp32 einsum directly would hand its fp32 cotangent to the two backward matmuls,
    which then run as fp32 (TF32) GEMMs, the most expensive kernels of a bf16 step (experiments/RESULTS.md).
    Here the cotangent is cast to the compute dtype first, as for every other matmul of the model; the GEMMs
    still accumulate in fp32. A 16-bit `out_dtype` is the GEMM's own output type (cuBLAS rounds its fp32
    accumulators once): an fp32 result converted afterwards costs a pass over the logits, which made bf16
    logits slower than fp32 ones (experiments/RESULTS.md).
    """
    if jnp.dtype(out_dtype).itemsize < 4:
        return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _head_matmul_fwd(x, w, spec, out_dtype):
    return head_matmul(x, w, spec, out_dtype), (x, w)


def _head_matmul_bwd(spec, out_dtype, residuals, g):
    x, w = residuals
    _, vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
    return vjp(g.astype(x.dtype))


head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def head_cross_entropy(
    x: jax.Array,
    w: jax.Array | Precast,
    labels: jax.Array,
    spec: str,
    out_dtype: jnp.dtype,
    sharding=None,
    kernel: str = "auto",
) -> jax.Array:
    """Per-position softmax cross-entropy (B, T) of the logits head_matmul(x, w, spec, out_dtype) against
    integer `labels` (B, T), in fp32.

    The forward pass computes, with the loss, the gradient of each position's loss with respect to its
    logits (softmax - onehot, `dsjax.models.xent`) in the compute dtype, and keeps that for the backward
    pass instead of the logits (half the bytes for fp32 logits and bf16 or fp16 compute). The backward
    pass feeds it to two compute-dtype GEMMs and applies each position's cotangent outside them, to the
    GEMMs' (B, T, D) sides. Differentiating the composition automatically would materialise an fp32
    gradient of the logits and convert it in a separate pass (experiments/RESULTS.md). `sharding` (of the
    logits), when given, pins their layout (vocab-parallel under tensor parallelism); `kernel` is
    model.loss_kernel. Without differentiation only the loss is computed. A `Precast` head computes with
    its cast and has its gradient written in its master's dtype by the GEMM (see `layers.project`).
    """
    master, compute = (w.master, w.compute) if isinstance(w, Precast) else (w, w)
    return _head_cross_entropy(x, master, jax.lax.stop_gradient(compute), labels, spec, out_dtype, sharding, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_cross_entropy(x, master, w, labels, spec, out_dtype, sharding, kernel) -> jax.Array:
    return xent.loss_only(_logits(x, w, spec, out_dtype, sharding), labels)


def _logits(x, w, spec, out_dtype, sharding):
    logits = head_matmul(x, w, spec, out_dtype)  # its forward only: the fused backward is hand-written
    return logits if sharding is None else jax.lax.with_sharding_constraint(logits, sharding)


def _head_cross_entropy_fwd(x, master, w, labels, spec, out_dtype, sharding, kernel):
    logits = _logits(x, w, spec, out_dtype, sharding)
    loss, unit = xent.loss_and_unit_grad(logits, labels, x.dtype, kernel, sharding)
    return loss, (x, w, unit, jnp.zeros((), master.dtype))


def _head_cross_entropy_bwd(spec, out_dtype, sharding, kernel, residuals, g):
    x, w, unit, master_dtype = residuals  # unit: d loss / d logits of each position, for a cotangent of 1
    if sharding is not None:
        unit = jax.lax.with_sharding_constraint(unit, sharding)
    g = g[..., None]  # dlogits = g * unit, so dx = g * (unit . w) and dw = unit . (g * x)
    _, dx_vjp = jax.vjp(lambda a: jnp.einsum(spec, a, w), x)
    (dx,) = dx_vjp(unit)
    scaled = (x.astype(jnp.float32) * g).astype(x.dtype)
    dw = weight_grad(spec, scaled, unit, master_dtype.dtype)
    return (dx.astype(jnp.float32) * g).astype(x.dtype), dw, None, None


_head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd)


def param_counts(state: nnx.State, cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters that take part in matmuls).

    The second is the N of the PaLM FLOPs count: the embedding table is a gather, not a matmul, so it is
    left out unless it is tied to the LM head; learned positions are a gather too and always left out.
    """
    total = matmul = 0
    for path, variable in nnx.to_flat_state(state):
        size = int(variable.get_value().size)
        total += size
        gather_only = path[0] == "positions" or (path[0] == "embed" and not cfg.tie_embeddings)
        matmul += 0 if gather_only else size
    return total, matmul
