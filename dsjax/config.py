"""The dsjax configuration tree: frozen keyword-only dataclasses, presets and the command line.

One section per concern (`model`, `mesh`, `train`, `data`). Every field carries a one-line doc
(`--help` prints it with the default). A section's `__post_init__` rejects values that are impossible
on their own; `Config.__post_init__` rejects impossible combinations across sections. Checks that need
the device count live in `dsjax.mesh.resolve_degrees`. Every rejection is a `ConfigError` whose message
names the field and the numbers, so the CLI can print it as one paragraph and exit 2.

Presets are plain Python functions returning a `Config`; `PRESETS` maps their names to them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value or combination; the message names the field and the numbers."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line doc that `--help` prints."""
    return field(default=default, metadata={"doc": text})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


FAMILIES = ("llama", "gpt2")
DATA_SOURCES = ("default", "text", "tokens", "synthetic")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
LOSS_KERNELS = ("auto", "xla", "pallas", "mosaic")
NORM_KERNELS = ("auto", "xla", "pallas")
GELU_KERNELS = ("auto", "xla", "pallas")
QKV_KERNELS = ("auto", "xla", "pallas")
LOSS_SCALES = ("auto", "dynamic", "static", "none")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = doc("llama", "decoder family: 'llama' (RMSNorm, RoPE, GQA, SwiGLU) or 'gpt2'")
    n_layers: int = doc(4, "number of decoder blocks (L)")
    d_model: int = doc(128, "residual stream width (D)")
    n_heads: int = doc(4, "query heads (N); head dim H = d_model / n_heads")
    n_kv_heads: int = doc(4, "key/value heads (K) for grouped-query attention; gpt2 needs K = N")
    d_ff: int = doc(384, "MLP hidden width (F)")
    vocab_size: int = doc(256, "token vocabulary size (V); 256 for the byte tokenizer")
    max_seq_len: int = doc(256, "longest sequence the model accepts (RoPE table / learned positions)")
    tie_embeddings: bool = doc(False, "share the input embedding with the LM head (GPT-2 does)")
    rope_theta: float = doc(10000.0, "RoPE base frequency (llama only)")
    norm_eps: float = doc(1e-5, "epsilon of RMSNorm / LayerNorm")
    init_std: float = doc(0.02, "std of the normal init; residual projections get std/sqrt(2L)")
    attention: str = doc("auto", "'auto' (cuDNN fused kernel on GPU where supported, else XLA), 'xla' or 'cudnn'")
    loss_kernel: str = doc(
        "auto",
        "LM-head loss and its logits gradient: 'auto' (on Hopper GPUs the Mosaic GPU kernel where a row of "
        "logits fits in shared memory, the vocabulary is a multiple of 128 and the gradient is in the logits' "
        "dtype, else the Pallas Triton kernel on "
        "GPU; XLA where tensor parallelism splits the vocabulary, with train.loss_chunk and on CPU), 'xla', "
        "'pallas' (interpreted on CPU: for tests) or 'mosaic' (interpreted on CPU from jax 0.11: for tests)",
    )
    norm_kernel: str = doc(
        "auto",
        "residual add + LayerNorm/RMSNorm: 'auto' (Pallas kernels for LayerNorm on GPU with d_model <= 8192; "
        "XLA for RMSNorm and on CPU), 'xla' or 'pallas' (interpreted on CPU: for tests)",
    )
    gelu_kernel: str = doc(
        "auto",
        "gpt2's bias + GELU: 'auto' (Pallas kernels with the GPU's tanh instruction for bf16/fp16 activations on "
        "GPU; XLA for fp32 and on CPU), 'xla' or 'pallas' (interpreted on CPU: for tests)",
    )
    qkv_kernel: str = doc(
        "auto",
        "gpt2's q/k/v bias gradient: 'auto' (a Pallas kernel gathers dq, dk, dv and sums them for the bias on GPU; "
        "XLA on CPU), 'xla' or 'pallas' (interpreted on CPU: for tests)",
    )
    scan_layers: bool = doc(
        True, "compile one block and scan it over the layers (fast compile); false unrolls them (XLA sees all)"
    )

    def __post_init__(self):
        _check_fields(self)
        _require(self.family in FAMILIES, f"model.family must be one of {FAMILIES}, got {self.family!r}.")
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name} must be a positive integer, got {value}.")
        _require(
            self.d_model % self.n_heads == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}) "
            "so that every head has the same width.",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
            f"({self.n_kv_heads}) for grouped-query attention.",
        )
        _require(
            self.family != "gpt2" or self.n_kv_heads == self.n_heads,
            f"model.family='gpt2' uses full multi-head attention: model.n_kv_heads ({self.n_kv_heads}) "
            f"must equal model.n_heads ({self.n_heads}).",
        )
        _require(
            self.family != "llama" or (self.d_model // self.n_heads) % 2 == 0,
            f"model.family='llama' applies RoPE to pairs of features: the head dim "
            f"d_model/n_heads = {self.d_model}/{self.n_heads} = {self.d_model // self.n_heads} must be even.",
        )
        _require(
            self.attention in ATTENTION_IMPLS,
            f"model.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}.",
        )
        _require(
            self.loss_kernel in LOSS_KERNELS,
            f"model.loss_kernel must be one of {LOSS_KERNELS}, got {self.loss_kernel!r}.",
        )
        _require(
            self.norm_kernel in NORM_KERNELS,
            f"model.norm_kernel must be one of {NORM_KERNELS}, got {self.norm_kernel!r}.",
        )
        _require(
            self.gelu_kernel in GELU_KERNELS,
            f"model.gelu_kernel must be one of {GELU_KERNELS}, got {self.gelu_kernel!r}.",
        )
        _require(
            self.qkv_kernel in QKV_KERNELS,
            f"model.qkv_kernel must be one of {QKV_KERNELS}, got {self.qkv_kernel!r}.",
        )
        _require(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}.")
        _require(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}.")
        _require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = doc(1, "data-parallel degree (replicated params, sharded batch); -1 = the rest")
    pipeline: int = doc(1, "pipeline-parallel degree (stages over layers); -1 = the rest")
    fsdp: int = doc(-1, "FSDP degree (ZeRO-3: params, grads, optimizer state sharded); -1 = the rest")
    tensor: int = doc(1, "tensor-parallel degree (Megatron-style heads / MLP split); -1 = the rest")

    def __post_init__(self):
        _check_fields(self)
        degrees = self.degrees()
        for name, value in degrees.items():
            _require(
                value == -1 or value >= 1,
                f"mesh.{name} must be a positive degree or -1 ('the rest of the devices'), got {value}.",
            )
        rest = [name for name, value in degrees.items() if value == -1]
        _require(
            len(rest) <= 1,
            f"at most one mesh degree may be -1 ('the rest'); got -1 for {', '.join('mesh.' + n for n in rest)}.",
        )

    def degrees(self) -> dict[str, int]:
        """The degrees in mesh-axis order (data, pipeline, fsdp, tensor)."""
        return {"data": self.data, "pipeline": self.pipeline, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = doc(200, "optimizer steps to run")
    batch_size: int = doc(32, "global batch, in sequences (split over data x fsdp)")
    seq_len: int = doc(128, "tokens per training sequence (T)")
    lr: float = doc(3e-3, "peak learning rate (after warmup)")
    min_lr_ratio: float = doc(0.1, "cosine decay floor as a fraction of train.lr")
    warmup_steps: int = doc(20, "linear warmup steps from 0 to train.lr (capped at train.steps)")
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay (matrices only, not norms/biases)")
    beta1: float = doc(0.9, "AdamW first-moment decay")
    beta2: float = doc(0.95, "AdamW second-moment decay")
    eps: float = doc(1e-8, "AdamW epsilon")
    grad_clip: float = doc(1.0, "global-norm gradient clipping threshold; 0 disables clipping")
    seed: int = doc(0, "seed of parameter init and data order")
    log_every: int = doc(10, "steps between metrics.jsonl lines")
    eval_every: int = doc(100, "steps between evaluations on the held-out split; 0 = only at the end")
    eval_batches: int = doc(4, "batches of train.batch_size sequences per evaluation")
    sample_tokens: int = doc(200, "tokens generated as a sample at the end of training; 0 = none")
    memory_budget_gb: float = doc(0.0, "per-device memory the step may use, GiB; 0 = the device's own limit")
    loss_chunk: int = doc(0, "positions per chunk of LM head + loss (bounds fp32 logits memory); 0 = all at once")
    grad_accum: int = doc(1, "microbatches per step: gradients of batch_size / grad_accum sequences summed, one update")

    def __post_init__(self):
        _check_fields(self)
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "grad_accum"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name} must be a positive integer, got {value}.")
        for name in ("warmup_steps", "eval_every", "sample_tokens"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name} must be >= 0, got {value}.")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}.")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}.")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name} must be in [0, 1), got {value}.")
        _require(self.eps > 0, f"train.eps must be > 0, got {self.eps}.")
        _require(self.memory_budget_gb >= 0, f"train.memory_budget_gb must be >= 0, got {self.memory_budget_gb}.")
        _require(
            self.loss_chunk >= 0 and (self.loss_chunk == 0 or self.seq_len % self.loss_chunk == 0),
            f"train.loss_chunk ({self.loss_chunk}) must be 0 or divide train.seq_len ({self.seq_len}).",
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = doc("default", "'default' (stdlib .py files, bytes), 'text', 'tokens' (.bin uint16) or 'synthetic'")
    path: str = doc("", "file or directory for data.source='text' or 'tokens'")
    tokenizer: str = doc("bytes", "'bytes' or the path of a Hugging Face tokenizer.json (data.source='text')")
    val_fraction: float = doc(0.02, "share of the data held out for evaluation")

    def __post_init__(self):
        _check_fields(self)
        _require(self.source in DATA_SOURCES, f"data.source must be one of {DATA_SOURCES}, got {self.source!r}.")
        _require(
            self.source not in ("text", "tokens") or self.path,
            f"data.source={self.source!r} reads local files: set data.path to a file or directory.",
        )
        _require(
            self.source in ("text", "tokens") or not self.path,
            f"data.path={self.path!r} is read only by data.source='text' or 'tokens', and data.source is "
            f"{self.source!r}: add --data.source=text (or tokens for .bin files), or drop data.path.",
        )
        _require(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}.")


def check_tensor_degree(model: ModelConfig, tensor: int) -> None:
    """Tensor parallelism splits heads, kv heads, the MLP and the vocabulary evenly over `tensor` devices."""
    if tensor <= 1:
        return
    for name in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        value = getattr(model, name)
        _require(
            value % tensor == 0,
            f"model.{name} ({value}) must be divisible by mesh.tensor ({tensor}): tensor parallelism "
            "splits it evenly across devices.",
        )


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    policy: str = doc("fp32", "'fp32', 'bf16', 'fp16', 'pure-bf16', or 'p=f32,c=bf16,o=f32' (param/compute/output)")
    loss_scale: str = doc("auto", "'auto' (dynamic for fp16 compute, none otherwise), 'dynamic', 'static', 'none'")
    init_scale: float = doc(2.0**16, "initial loss scale (the fixed one for 'static')")
    growth_interval: int = doc(2000, "finite steps in a row before the dynamic scale grows")
    growth_factor: float = doc(2.0, "dynamic scale multiplier after growth_interval finite steps")
    backoff_factor: float = doc(0.5, "dynamic scale multiplier after a non-finite step")
    min_scale: float = doc(1.0, "the dynamic scale never backs off below this")
    max_scale: float = doc(2.0**32, "the dynamic scale never grows above this")
    max_consecutive_skips: int = doc(25, "stop training after this many non-finite (skipped) steps in a row")

    def __post_init__(self):
        _check_fields(self)
        from dsjax.precision import dynamic_loss_scale, loss_scale_from_config, parse_policy  # imported late

        parse_policy(self.policy)
        _require(
            self.loss_scale in LOSS_SCALES,
            f"precision.loss_scale must be one of {LOSS_SCALES}, got {self.loss_scale!r}.",
        )
        _require(
            self.max_consecutive_skips >= 1,
            f"precision.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}.",
        )
        dynamic_loss_scale(self)  # validates every scaling number, also those the chosen kind leaves unused
        loss_scale_from_config(self)


@dataclass(frozen=True, kw_only=True)
class RematConfig:
    policy: str = doc(
        "none", "activation rematerialisation: none, full, dots, dots_attention, qkv_out, minimal, offload"
    )
    every: int = doc(1, "checkpoint every N layers (recompute N layers from one saved input); divides n_layers")
    prevent_cse: bool = doc(
        False,
        "unrolled layers (model.scan_layers=false): keep XLA from merging the recomputation into the forward "
        "pass; less memory, a slower step (llama-1b batch 12: 7.1 GiB less, 1.35% slower)",
    )

    def __post_init__(self):
        _check_fields(self)
        from dsjax.remat import REMAT_POLICIES

        _require(
            self.policy in REMAT_POLICIES,
            f"remat.policy must be one of {tuple(REMAT_POLICIES)}, got {self.policy!r}.",
        )
        _require(self.every >= 1, f"remat.every must be >= 1, got {self.every}.")


PIPELINE_SCHEDULES = ("gpipe", "circular", "1f1b")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    schedule: str = doc("gpipe", "with mesh.pipeline > 1: gpipe, circular or 1f1b (memory bounded by the stages)")
    microbatches: int = doc(0, "microbatches the global batch is split into (0: one per stage)")
    repeats: int = doc(1, "circular: layer chunks per stage (the bubble shrinks to (P-1)/(R*M+P-1))")
    unroll: bool = doc(True, "gpipe, circular: ticks as straight-line code (faster, more memory); false: scans")

    def __post_init__(self):
        _check_fields(self)
        _require(
            self.schedule in PIPELINE_SCHEDULES,
            f"pipeline.schedule must be one of {PIPELINE_SCHEDULES}, got {self.schedule!r}.",
        )
        _require(
            self.microbatches >= 0, f"pipeline.microbatches must be >= 0 (0: one per stage), got {self.microbatches}."
        )
        _require(self.repeats >= 1, f"pipeline.repeats must be >= 1, got {self.repeats}.")
        _require(
            self.repeats == 1 or self.schedule == "circular",
            f"pipeline.repeats={self.repeats} needs pipeline.schedule=circular (gpipe places one chunk per stage).",
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str = doc("", "checkpoint directory (default <out>/checkpoints)")
    every: int = doc(500, "save every N steps (0: only at the end and on preemption)")
    every_minutes: float = doc(0.0, "also save when this many minutes passed since the last save (0: off)")
    keep: int = doc(3, "finalized checkpoints kept (older ones are deleted)")
    async_save: bool = doc(True, "write in the background; training waits only for the copy off the devices")
    device_copy: bool = doc(
        True,
        "with async_save: copy the state on the devices and take that copy off them in a background thread, so "
        "training does not wait for it (needs room for one more copy of the state; single-process runs)",
    )
    restore: str = doc("auto", "'auto' (latest good checkpoint in dir, if any), 'none', a step number or a path")
    fallback: bool = doc(True, "if the chosen checkpoint is corrupt, warn and use the previous good one")
    enabled: bool = doc(True, "save and restore checkpoints at all (needs a run directory)")
    rollback_on_nonfinite: bool = doc(
        False,
        "on a non-finite loss (or precision.max_consecutive_skips skipped steps in a row), restore the last "
        "good checkpoint before it and go on without the offending batch(es)",
    )
    max_rollbacks: int = doc(3, "rollbacks allowed in one run before it stops with an error")

    def __post_init__(self):
        _check_fields(self)
        _require(self.every >= 0, f"checkpoint.every must be >= 0 steps, got {self.every}.")
        _require(self.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0 minutes, got {self.every_minutes}.")
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}.")
        _require(bool(self.restore), "checkpoint.restore must be 'auto', 'none', a step number or a path; got ''.")
        _require(self.max_rollbacks >= 0, f"checkpoint.max_rollbacks must be >= 0, got {self.max_rollbacks}.")


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    tensorboard: bool = doc(True, "write TensorBoard event files to <out>/tensorboard (process 0)")
    prometheus_port: int = doc(0, "serve Prometheus metrics on this port (local process r: port + r); 0 = off")
    prometheus_host: str = doc("127.0.0.1", "address the Prometheus endpoint listens on ('0.0.0.0': every interface)")
    gpu_stats: bool = doc(True, "sample GPU utilisation, memory, temperature, power and SM clock through NVML")
    gpu_every_s: float = doc(2.0, "seconds between NVML samples (taken by a background thread)")
    advisor: bool = doc(True, "print, log and export advice when the metrics show a fixable problem")
    run_name: str = doc("", "the `run` label of exported metrics (default: the run directory's name)")

    def __post_init__(self):
        _check_fields(self)
        _require(
            0 <= self.prometheus_port <= 65535,
            f"monitor.prometheus_port must be a TCP port in 1..65535 (0 = off), got {self.prometheus_port}.",
        )
        _require(bool(self.prometheus_host), "monitor.prometheus_host must be an address, got ''.")
        _require(self.gpu_every_s > 0, f"monitor.gpu_every_s must be > 0 seconds, got {self.gpu_every_s}.")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    steps: str = doc("", "START:END: a jax.profiler trace of steps START..END (1-based, inclusive) in <out>/profile")

    def __post_init__(self):
        _check_fields(self)
        self.span()

    def span(self) -> tuple[int, int] | None:
        """(START, END) of profile.steps, or None when no trace is asked for."""
        if not self.steps:
            return None
        start, sep, end = self.steps.partition(":")
        try:
            first, last = int(start), int(end)
        except ValueError:
            first = last = 0
        _require(
            bool(sep) and 1 <= first <= last,
            f"profile.steps must be START:END with 1 <= START <= END (steps, 1-based, inclusive), got "
            f"{self.steps!r}; e.g. --profile.steps=10:12 traces steps 10, 11 and 12.",
        )
        return first, last


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "precision": PrecisionConfig,
    "remat": RematConfig,
    "pipeline": PipelineConfig,
    "checkpoint": CheckpointConfig,
    "monitor": MonitorConfig,
    "profile": ProfileConfig,
}


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    remat: RematConfig = field(default_factory=RematConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self):
        _check_sections(self)
        _require(
            self.model.n_layers % self.remat.every == 0,
            f"remat.every ({self.remat.every}) must divide model.n_layers ({self.model.n_layers}): layers are "
            "checkpointed in equal groups.",
        )
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
            "lower the first or raise the second.",
        )
        check_tensor_degree(self.model, self.mesh.tensor)
        span = self.profile.span()
        _require(
            span is None or span[1] <= self.train.steps,
            f"profile.steps={self.profile.steps!r} ends after train.steps ({self.train.steps}); trace steps that run.",
        )

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, tree: dict[str, dict[str, Any]]) -> Config:
        unknown = sorted(set(tree) - set(SECTIONS))
        _require(not unknown, f"unknown config section(s) {unknown}; known: {sorted(SECTIONS)}.")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = dict(tree.get(name, {}))
            names = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - names)
            _require(not bad, f"unknown field(s) {', '.join(f'{name}.{b}' for b in bad)} in the config.")
            sections[name] = section_cls(**values)  # which checks its fields' types (_check_fields)
        return cls(**sections)


# ----------------------------------------------------------------------------------------------------
# Presets: plain functions, each returning a complete Config.


def tiny() -> Config:
    """The embedded default: a ~0.8M-parameter byte-level llama trained on the stdlib's source on CPU."""
    return Config()


# The accelerator presets compute in bf16 (fp32 master weights) and recompute everything but the weight
# matmuls and the fused attention: on one H100, remat 'dots_attention' was the fastest policy for both
# gpt2-124m and llama-1b (experiments/RESULTS.md), since saving more activations costs more memory
# traffic than recomputing them; with gpt2's later kernels, no remat became faster there (gpt2_124m).
# Their layers are unrolled (model.scan_layers=false): 8-9% faster than the scanned loop on one H100, for a
# longer compile and a few GiB more memory.
def gpu_defaults() -> dict[str, Any]:
    return {"precision": PrecisionConfig(policy="bf16"), "remat": RematConfig(policy="dots_attention")}


def gpt2_124m() -> Config:
    """GPT-2 small in the nanoGPT benchmark shape (vocab padded to 50304, T=1024, tied embeddings)."""
    return Config(
        model=ModelConfig(
            family="gpt2",
            n_layers=12,
            d_model=768,
            n_heads=12,
            n_kv_heads=12,
            d_ff=3072,
            vocab_size=50304,
            max_seq_len=1024,
            tie_embeddings=True,
            scan_layers=False,
        ),
        train=TrainConfig(steps=5000, batch_size=32, seq_len=1024, lr=6e-4, warmup_steps=700, eval_every=500),
        data=DataConfig(source="synthetic"),
        # Logits in bf16 (the loss is still computed in fp32 from them, as MaxText's default and PyTorch's
        # autocast do), and no remat: each measured faster on an H200 at batch 32, the first by 2.2% and 3
        # GiB less, the second by 1.2% for the same compiled memory (experiments/RESULTS.md). llama-1b keeps
        # fp32 logits (bf16 ones measured 1.2% slower there) and remat 'dots_attention' (memory).
        precision=PrecisionConfig(policy="p=f32,c=bf16,o=bf16"),
        remat=RematConfig(policy="none"),
    )


def llama_1b() -> Config:
    """A Llama-3.2-1B-shaped model: 16 layers, D=2048, 32 heads / 8 kv heads, F=8192, V=128256."""
    return Config(
        model=ModelConfig(
            family="llama",
            n_layers=16,
            d_model=2048,
            n_heads=32,
            n_kv_heads=8,
            d_ff=8192,
            vocab_size=128256,
            max_seq_len=2048,
            rope_theta=500000.0,
            tie_embeddings=True,
            scan_layers=False,
        ),
        train=TrainConfig(steps=5000, batch_size=8, seq_len=2048, lr=3e-4, warmup_steps=500, eval_every=500),
        data=DataConfig(source="synthetic"),
        **gpu_defaults(),
    )


def llama_7b() -> Config:
    """A Llama-2-7B-shaped model: 32 layers, D=4096, 32 heads, F=11008, V=32000, T=4096."""
    return Config(
        model=ModelConfig(
            family="llama",
            n_layers=32,
            d_model=4096,
            n_heads=32,
            n_kv_heads=32,
            d_ff=11008,
            vocab_size=32000,
            max_seq_len=4096,
        ),
        train=TrainConfig(steps=5000, batch_size=8, seq_len=4096, lr=3e-4, warmup_steps=500, eval_every=500),
        data=DataConfig(source="synthetic"),
        **gpu_defaults(),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny,
    "gpt2-124m": gpt2_124m,
    "llama-1b": llama_1b,
    "llama-7b": llama_7b,
}


def preset(name: str) -> Config:
    _require(
        name in PRESETS,
        f"--preset={name!r} is not a known preset; choose one of: {', '.join(PRESETS)}.",
    )
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------------
# Overrides: "section.field" -> value strings (from the command line) applied to a Config.


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError


_PARSERS: dict[Any, tuple[Callable[[str], Any], str]] = {
    int: (lambda s: int(s.replace("_", "")), "an integer"),
    float: (_parse_float, "a finite number"),
    bool: (_parse_bool, "a boolean (true/false)"),
    str: (str, "a string"),
}


@functools.cache
def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


@functools.cache
def _section_name(section_cls: type) -> str:
    return next((name for name, cls in SECTIONS.items() if issubclass(section_cls, cls)), section_cls.__name__)


def _check_fields(section: Any) -> None:
    """A ConfigError naming the first field of `section` (a section dataclass) whose value is not of its type,
    before the section's own checks compare it with numbers (Python callers pass any object)."""
    name = _section_name(type(section))
    for key, kind in _field_types(type(section)).items():
        value = _plain(getattr(section, key), kind)
        object.__setattr__(section, key, value)  # frozen: the plain value replaces what was given
        _check_type(f"{name}.{key}", value, kind)


def _plain(value: Any, kind: type) -> Any:
    """`value` as config.json can hold it where a caller's object stands for one: a NumPy scalar's number
    (an integer for an int field, any real for a float field), a pathlib.Path's string; else `value`."""
    if kind is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool | int | float) or not isinstance(value, numbers.Real):
        return value
    if kind is float or (kind is int and isinstance(value, numbers.Integral)):
        return kind(value)
    return value


def _check_sections(config: Any) -> None:
    for name, cls in SECTIONS.items():
        value = getattr(config, name)
        _require(
            isinstance(value, cls),
            f"Config.{name} must be a {cls.__name__}, got {value!r} ({type(value).__name__}); build it as "
            f"{cls.__name__}(...), or the whole config from plain dicts with Config.from_dict.",
        )


def _check_type(key: str, value: Any, kind: type) -> None:
    """A field's value must have its type (an int is accepted where a float is due; a float must be finite)."""
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if kind is float and ok:
        ok = math.isfinite(value)
    _require(ok, f"{key} must be {_PARSERS[kind][1]}, got {value!r} ({type(value).__name__}).")


def parse_value(key: str, text: str) -> Any:
    """Parse `text` as the type of config field `key` ('section.field'), or raise ConfigError."""
    section, name = _split_key(key)
    kind = _field_types(SECTIONS[section])[name]
    parser, described = _PARSERS[kind]
    try:
        return parser(text)
    except ValueError:
        raise ConfigError(f"--{key} expects {described}, got {text!r}.") from None


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        hint = difflib.get_close_matches(section, list(SECTIONS), n=1)
        raise ConfigError(
            f"unknown option --{key}: options look like --section.field=value with section one of "
            f"{', '.join(SECTIONS)}" + (f" (did you mean --{hint[0]}.{name}?)." if hint else ".")
        )
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"unknown option --{key}: section '{section}' has no field '{name}'"
            + (f" (did you mean --{section}.{hint[0]}?)." if hint else f"; its fields are {', '.join(names)}.")
        )
    return section, name


def apply_overrides(config: Config, overrides: dict[str, str]) -> Config:
    """Return `config` with each 'section.field' set from its string value (validated, typed)."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, text in overrides.items():
        section, name = _split_key(key)
        by_section.setdefault(section, {})[name] = parse_value(key, text)
    sections = {name: dataclasses.replace(getattr(config, name), **values) for name, values in by_section.items()}
    return config.replace(**sections)


def help_text(defaults: Config | None = None) -> str:
    """Every field, with its default (from `defaults`) and its doc, section by section."""
    defaults = defaults or Config()
    lines = []
    for section, section_cls in SECTIONS.items():
        lines.append(f"[{section}]")
        current = getattr(defaults, section)
        for f in dataclasses.fields(section_cls):
            lines.append(f"  --{section}.{f.name}={getattr(current, f.name)!r}".ljust(40) + f"  {f.metadata['doc']}")
    return "\n".join(lines)


def split_known(
    argv: Sequence[str], value_flags: Sequence[str], switches: Sequence[str] = ()
) -> tuple[dict[str, str | None], dict[str, str]]:
    """Split argv into top-level flags and 'section.field' overrides.

    `value_flags` take a value (`--out=DIR` or `--out DIR`), `switches` take none (`--dry-run`), and
    overrides are `--section.field=value` or `--section.field value`. Anything else is a ConfigError.
    """
    top: dict[str, str | None] = {}
    overrides: dict[str, str] = {}
    args = list(argv)
    known = [*value_flags, *switches]
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.field=value.")
        key, eq, value = arg[2:].partition("=")
        if key in switches:
            if eq:
                raise ConfigError(f"--{key} takes no value, got {arg!r}.")
            top[key] = None
        elif key in value_flags or "." in key:
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE.")
                i += 1
                value = args[i]
            if key in value_flags:
                if not value:
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE.")
                top[key] = value
            else:
                _split_key(key)
                overrides[key] = value
        else:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"unknown option --{key}"
                + (f" (did you mean --{hint[0]}?)" if hint else "")
                + f"; top-level options are {', '.join('--' + f for f in known)}, and fields are set with "
                "--section.field=value (see --help)."
            )
        i += 1
    return top, overrides
