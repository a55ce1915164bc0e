"""A training run as data: `build` turns a Config into a `Run` (mesh, data, sharded state, compiled
steps), and the functions here use one: batches of its data (`batch_at`, `indexed_batches`), `evaluate`,
`compile_report` and `prepare` (compile + memory preflight), `materialize` and `abstract_state` (for
restores), `sample`. `dsjax.train` trains a Run; notebooks and tests use these directly.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from dsjax import data as data_lib
from dsjax import memory, pipeline
from dsjax.config import Config, ConfigError
from dsjax.mesh import check_config, make_mesh
from dsjax.metrics import flops_per_token, peak_flops
from dsjax.models import param_counts
from dsjax.models.layers import attention_impl
from dsjax.optim import make_optimizer, schedule
from dsjax.precision import loss_scale_from_config, parse_policy
from dsjax.remat import check_platform
from dsjax.sharding import describe, logical_axes, resolve
from dsjax.state import TrainState, abstract_train_state, create_train_state, init_fn
from dsjax.step import batch_sharding, make_eval_step, make_next_token, make_train_step


@dataclasses.dataclass
class Run:
    """Everything one training run needs, built by `build`."""

    config: Config
    mesh: jax.sharding.Mesh
    degrees: dict[str, int]
    corpus: data_lib.Corpus | None
    train_samples: object
    val_samples: object
    graphdef: nnx.GraphDef
    state: TrainState  # abstract (shapes and shardings only) after build(abstract=True)
    shardings: TrainState
    train_step: Callable
    eval_step: Callable
    batch_sharding: jax.sharding.NamedSharding
    n_params: int
    n_matmul_params: int
    flops_per_token: tuple[float, float]  # (PaLM, causal)
    peak_flops: float | None  # dense peak of all the run's devices together, for the compute dtype
    batch_offset: int = 0  # step s trains on global batch s + batch_offset (non-zero after a batch-size change)

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len


def _samples(config: Config, corpus: data_lib.Corpus | None, split: str):
    t = config.train
    if corpus is None:
        return data_lib.SyntheticSamples(config.model.vocab_size, t.seq_len, t.seed + (split == "val"))
    tokens = corpus.train if split == "train" else corpus.val
    return data_lib.WindowSamples(tokens, t.seq_len, t.seed, shuffle=True, split=split)


def load_data(config: Config) -> tuple[data_lib.Corpus | None, object, object]:
    """(corpus, train samples, val samples); checks the tokenizer fits the model's vocabulary."""
    corpus = data_lib.load_corpus(config.data)
    if corpus is not None and corpus.vocab_size is not None and corpus.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {corpus.vocab_size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; set --model.vocab_size={corpus.vocab_size} or larger."
        )
    return corpus, _samples(config, corpus, "train"), _samples(config, corpus, "val")


def build(config: Config, devices: Sequence[jax.Device] | None = None, abstract: bool = False) -> Run:
    """Validate against the devices, load data, create the born-sharded state and define the jitted steps.

    With `abstract=True` nothing is allocated: the state holds only shapes and shardings (--dry-run).
    """
    devices = list(devices) if devices is not None else jax.devices()
    degrees = check_config(config, len(devices))
    policy = parse_policy(config.precision.policy)
    check_platform(config.remat.policy, devices[0].platform)
    attention_impl(config.model.attention, policy.compute, config.model.head_dim, devices[0].platform)
    corpus, train_samples, val_samples = load_data(config)
    mesh = make_mesh(degrees, devices)
    tx = make_optimizer(config.train)
    loss_scale = loss_scale_from_config(config.precision)
    make = abstract_train_state if abstract else create_train_state
    graphdef, state, shardings = make(config, tx, loss_scale, mesh)
    n_params, n_matmul = param_counts(state.params, config.model)
    _check_sharded(state.params, mesh, degrees, config)
    bs = batch_sharding(mesh, config.train.batch_size, config.train.seq_len)
    return Run(
        config=config,
        mesh=mesh,
        degrees=degrees,
        corpus=corpus,
        train_samples=train_samples,
        val_samples=val_samples,
        graphdef=graphdef,
        state=state,
        shardings=shardings,
        train_step=make_train_step(
            graphdef,
            tx,
            schedule(config.train),
            mesh,
            shardings,
            bs,
            loss_scale,
            chunk=config.train.loss_chunk,
            accum=config.train.grad_accum,
            plan=pipeline.make_plan(config, degrees),
        ),
        eval_step=make_eval_step(graphdef, mesh, shardings, bs, config.train.loss_chunk),
        batch_sharding=bs,
        n_params=n_params,
        n_matmul_params=n_matmul,
        flops_per_token=flops_per_token(config.model, n_matmul, config.train.seq_len),
        peak_flops=_mesh_peak(devices, policy.compute.name),
    )


def _mesh_peak(devices: Sequence[jax.Device], dtype: str) -> float | None:
    """Dense peak FLOP/s of all devices of the run together (MFU divides global throughput by it)."""
    one = peak_flops(devices[0], dtype)
    return None if one is None else one * len(devices)


def _check_sharded(params, mesh, degrees: dict[str, int], config: Config) -> None:
    """Guard rail: with fsdp or tensor degrees > 1, some weight must actually be split."""
    if degrees["fsdp"] * degrees["tensor"] == 1:
        return
    weights = [v for _, v in nnx.to_flat_state(params) if v.get_value().ndim >= 2]
    if all(resolve(logical_axes(v), v.get_value().shape, mesh) == PartitionSpec() for v in weights):
        m = config.model
        raise ConfigError(
            f"mesh.fsdp={degrees['fsdp']} x mesh.tensor={degrees['tensor']}, yet no weight can be split: the "
            f"model's dimensions (d_model={m.d_model}, d_ff={m.d_ff}, n_heads={m.n_heads}, vocab_size="
            f"{m.vocab_size}) are not divisible by those degrees, so every device would hold a full copy."
        )


def batch_at(run: Run, samples, index: int) -> jax.Array:
    """Global batch `index` of `samples`, sharded for the train and eval steps."""
    return data_lib.global_batch(
        samples, index, run.config.train.batch_size, run.batch_sharding, run.config.model.vocab_size
    )


def _platform(run: Run) -> str:
    return run.mesh.devices.flat[0].platform


def indexed_batches(run: Run, samples, indices: Iterable[int], depth: int = 2) -> Iterator[tuple[int, jax.Array]]:
    """(index, global batch `index` of `samples`) for each of `indices`, each handed out with the next
    `depth` already built and on their way to the devices (transfers are asynchronous), so the device
    never waits for the host's data between steps."""
    ahead: collections.deque[tuple[int, jax.Array]] = collections.deque()
    todo = iter(indices)
    while True:
        while len(ahead) <= depth and (index := next(todo, None)) is not None:
            ahead.append((index, batch_at(run, samples, index)))
        if not ahead:
            return
        yield ahead.popleft()


def batches(run: Run, samples, start: int, stop: int, depth: int = 2) -> Iterator[jax.Array]:
    """Global batches start, ..., stop - 1 of `samples`, prefetched as `indexed_batches` does."""
    for _, batch in indexed_batches(run, samples, range(start, stop), depth):
        yield batch


def evaluate(run: Run) -> float:
    """Mean loss (nats/token) over train.eval_batches fixed batches of the held-out split."""
    losses = [
        run.eval_step(run.state.params, batch_at(run, run.val_samples, i)) for i in range(run.config.train.eval_batches)
    ]
    return float(np.mean(jax.device_get(losses)))


def compile_report(run: Run, compiled, shardings: bool = False) -> str:
    """Mesh, parameter count, FLOPs per token, precision and remat, per-device memory from the compiled
    memory analysis and, with `shardings`, every parameter's sharding."""
    state, mem, cfg = run.state, compiled.memory_analysis(), run.config
    palm, causal = run.flops_per_token
    remat = cfg.remat.policy + (f" every {cfg.remat.every} layers" if cfg.remat.policy != "none" else "")
    remat += ", prevent_cse" if cfg.remat.prevent_cse and cfg.remat.policy != "none" else ""
    plan = pipeline.make_plan(cfg, run.degrees)
    param_bytes = memory.shard_bytes(state.params, run.shardings.params)
    opt_bytes = memory.shard_bytes(state.opt_state, run.shardings.opt_state)
    lines = [
        f"mesh: {run.degrees} over {run.mesh.devices.size} {run.mesh.devices.flat[0].platform} device(s)",
        *([] if plan is None else [plan.describe(cfg.model.n_layers)]),
        f"parameters: {run.n_params:,} ({run.n_matmul_params:,} in matmuls)",
        f"FLOPs/token: {palm:.4g} (PaLM count), {causal:.4g} (causal attention)",
        f"precision: {cfg.precision.policy} ({parse_policy(cfg.precision.policy)}), loss scale "
        f"{type(loss_scale_from_config(cfg.precision)).__name__}; remat: {remat}",
        "per-device memory:",
        f"  parameters        {memory.fmt_bytes(param_bytes)}",
        f"  optimizer state   {memory.fmt_bytes(opt_bytes)}",
    ]
    if mem is not None:
        limit, source = memory.budget(cfg, jax.local_devices()[0])
        lines += [
            f"  temporaries       {memory.fmt_bytes(mem.temp_size_in_bytes)} (activations and workspace)",
            f"  arguments/outputs {memory.fmt_bytes(mem.argument_size_in_bytes)} / "
            f"{memory.fmt_bytes(mem.output_size_in_bytes)} (aliased by donation: "
            f"{memory.fmt_bytes(mem.alias_size_in_bytes)})",
            f"  step total        {memory.fmt_bytes(memory.step_bytes(mem))}"
            + ("" if limit is None else f" of {memory.fmt_bytes(limit)} ({source})"),
        ]
        c = cfg.checkpoint
        if c.enabled and c.async_save and c.device_copy:
            lines.append(
                f"  checkpoint copy   {memory.fmt_bytes(param_bytes + opt_bytes)} more while a save is handed off "
                "(checkpoint.device_copy; made only where it fits)"
            )
    if shardings:
        lines.append("parameter shardings (path, shape, spec):")
        lines += [f"  {path:<28} {shape!s:<22} {spec}" for path, shape, spec in describe(state.params, run.mesh)]
    return "\n".join(lines)


def prepare(run: Run, log: Callable[[str], None] = print):
    """Compile the train step for the run's next batch, log the compile report and run the memory
    preflight (a ConfigError when the step cannot fit). Returns the compiled step."""
    first = batch_at(run, run.train_samples, int(jax.device_get(run.state.step)))
    compiled = run.train_step.lower(run.state, first).compile()
    log(compile_report(run, compiled))
    memory.preflight(run.config, compiled.memory_analysis(), jax.local_devices()[0], run.degrees)
    return compiled


def abstract_state(run: Run) -> TrainState:
    """run.state as shapes, dtypes and shardings only: the target a checkpoint is read into."""
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), run.state, run.shardings
    )


def materialize(run: Run) -> None:
    """Give a run built with abstract=True its initialised state (each device creates only its shard)."""
    if isinstance(run.state.step, jax.ShapeDtypeStruct):
        config = run.config
        init = init_fn(config, make_optimizer(config.train), loss_scale_from_config(config.precision))
        run.state = jax.jit(init, out_shardings=run.shardings)()


def sample(run: Run, prompt: str, n_tokens: int, temperature: float = 0.8, seed: int = 0) -> str | None:
    """Continue `prompt` by `n_tokens` sampled tokens; None when the data has no tokenizer."""
    if not isinstance(prompt, str):
        raise ConfigError(f"sample's prompt must be a string, got {prompt!r} ({type(prompt).__name__}).")
    if not isinstance(n_tokens, numbers.Integral) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise ConfigError(f"sample's n_tokens must be an integer >= 0, got {n_tokens!r}.")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"sample's temperature must be a finite number >= 0 (0: greedy), got {temperature!r}.")
    corpus = run.corpus
    if corpus is None or corpus.encode is None:
        return None
    width = run.config.train.seq_len
    next_token = make_next_token(run.graphdef, run.mesh, run.shardings, temperature)
    tokens = list(corpus.encode(prompt)) or [0]
    key = jax.random.key(seed)
    for _ in range(n_tokens):
        context = tokens[-width:]
        window = np.zeros((1, width), np.int32)
        window[0, : len(context)] = context
        key, sub = jax.random.split(key)
        tokens.append(int(next_token(run.state.params, window, len(context) - 1, sub)))
    return corpus.decode(tokens)
