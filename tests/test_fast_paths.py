"""The GPU performance paths compute what the plain ones do: the fused LM head + cross-entropy and its
one-pass logsumexp, unrolled layers, the prefetching batch iterator and the lagged metrics reads.

Tolerances: fp32 values relative 1e-6 (the same ops in a different association), the one-pass
logsumexp 1e-5 relative (its running rescale adds a few ulps per element); bf16 gradients to bf16's
rounding of the fp32 reference (relative 2^-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsjax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, apply_overrides, preset
from dsjax.models import Decoder
from dsjax.models.decoder import head_cross_entropy, head_matmul
from dsjax.models.xent import logsumexp
from dsjax.step import loss_fn
from dsjax.train import batch_at, batches, build, fit

KEYS = jax.random.split(jax.random.key(0), 4)


def reference_losses(x, w, labels, spec, out_dtype):
    logits = head_matmul(x, w, spec, jnp.dtype(out_dtype)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@pytest.mark.parametrize("spec, w_shape", [("BTD,VD->BTV", (96, 16)), ("BTD,DV->BTV", (16, 96))])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_fused_head_cross_entropy_matches_optax_on_the_logits(spec, w_shape, out_dtype):
    x = jax.random.normal(KEYS[0], (3, 8, 16))
    w = 0.3 * jax.random.normal(KEYS[1], w_shape)
    labels = jax.random.randint(KEYS[2], (3, 8), 0, 96)
    weights = jax.random.uniform(KEYS[3], (3, 8))  # a non-uniform cotangent

    def fused(x, w):
        return (head_cross_entropy(x, w, labels, spec, jnp.dtype(out_dtype)) * weights).sum()

    def plain(x, w):
        return (reference_losses(x, w, labels, spec, out_dtype) * weights).sum()

    (got, got_grads), (want, want_grads) = (jax.value_and_grad(f, (0, 1))(x, w) for f in (fused, plain))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # With bf16 logits, autodiff of the plain composition rounds the logits' gradient to bf16 (the cotangent
    # of a bf16 value); the fused backward keeps it in x's dtype (fp32 here), so they differ by that rounding.
    tol = 1e-5 if out_dtype == jnp.float32 else 2**-7
    for g, r in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(jnp.abs(r).max()))


def test_fused_head_backward_runs_in_the_compute_dtype_and_rounds_like_it():
    x = jax.random.normal(KEYS[0], (2, 8, 16)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(KEYS[1], (64, 16))).astype(jnp.bfloat16)
    labels = jax.random.randint(KEYS[2], (2, 8), 0, 64)

    def fused(x, w):
        return head_cross_entropy(x, w, labels, "BTD,VD->BTV", jnp.dtype(jnp.float32)).mean()

    grads = jax.grad(fused, (0, 1))(x, w)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    # every dot_general of the gradient program takes bf16 operands: no fp32 (TF32 on GPUs) GEMM
    hlo = jax.jit(jax.grad(fused, (0, 1))).lower(x, w).as_text()
    operands = [line.split(": (")[-1].split(") ->")[0] for line in hlo.splitlines() if "dot_general" in line]
    assert len(operands) == 3 and all("f32" not in o and "bf16" in o for o in operands), operands
    fp32 = jax.grad(lambda x, w: reference_losses(x, w, labels, "BTD,VD->BTV", jnp.float32).mean(), (0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32)
    )
    for g, r in zip(grads, fp32, strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), r, rtol=2**-7, atol=2**-7 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("out_dtype, written", [(jnp.bfloat16, "bf16"), (jnp.float16, "f16"), (jnp.float32, "f32")])
def test_the_head_gemm_writes_the_logits_in_their_dtype(out_dtype, written):
    """16-bit logits come out of the GEMM itself (cuBLAS rounds its fp32 accumulators once): an fp32 result
    converted afterwards costs a pass over the logits, which made bf16 logits slower than fp32 ones."""
    x = jax.random.normal(KEYS[0], (2, 8, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(KEYS[1], (64, 16)).astype(jnp.bfloat16)
    hlo = jax.jit(lambda x, w: head_matmul(x, w, "BTD,VD->BTV", jnp.dtype(out_dtype))).lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 1 and dots[0].rstrip().endswith(f"tensor<2x8x64x{written}>"), dots
    assert "convert" not in hlo
    got = head_matmul(x, w, "BTD,VD->BTV", jnp.dtype(out_dtype))
    want = jnp.einsum("BTD,VD->BTV", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8 if written != "f32" else 1e-6, atol=1e-5)


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (30.0, 0.0), (1.0, 1e4), (5.0, -3e3)])
def test_one_pass_logsumexp_matches_the_two_pass_one(scale, shift):
    x = scale * jax.random.normal(KEYS[0], (4, 5, 1000)) + shift
    np.testing.assert_allclose(jax.jit(logsumexp)(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-5)


def test_one_pass_logsumexp_handles_minus_infinity():
    x = jnp.full((2, 6), -jnp.inf).at[0, 2].set(1.5).at[1].set(jnp.arange(6.0))
    np.testing.assert_allclose(logsumexp(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6)


FAMILIES = {
    "llama": ModelConfig(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32),
    "gpt2": ModelConfig(
        family="gpt2", n_layers=4, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=32, tie_embeddings=True
    ),
}
BATCH = jax.random.randint(KEYS[3], (4, 33), 0, 256)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy, every", [("none", 1), ("dots_attention", 1), ("full", 2)])
def test_unrolled_layers_give_the_loss_and_gradients_of_the_scanned_ones(family, policy, every):
    results = []
    for scan in (True, False):
        cfg = ModelConfig(**{**FAMILIES[family].__dict__, "scan_layers": scan})
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), remat_policy=policy, remat_every=every), nnx.Param)
        results.append(jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss_fn(g, p, BATCH, None)))(params))
    (scanned_loss, scanned), (unrolled_loss, unrolled) = results
    np.testing.assert_allclose(unrolled_loss, scanned_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def tiny_config(**train) -> Config:
    return Config(
        model=ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16),
        data=DataConfig(source="default"),
        train=TrainConfig(batch_size=4, seq_len=16, **train),
    )


@pytest.mark.parametrize("start, depth", [(0, 0), (0, 2), (3, 5)])
def test_prefetched_batches_are_the_batches_of_their_steps(start, depth):
    run = build(tiny_config(steps=4), devices=jax.devices()[:1])
    got = list(batches(run, run.train_samples, start, 9, depth=depth))
    assert len(got) == 9 - start
    for index, batch in zip(range(start, 9), got, strict=True):
        np.testing.assert_array_equal(batch, batch_at(run, run.train_samples, index))


def test_lagged_metrics_reads_log_every_step_once_and_in_order(monkeypatch):
    import dsjax.train as train_lib

    # Force the accelerator lag on CPU: every step's metrics are still read, in order, and the records
    # are those of the step-by-step loop.
    config = tiny_config(steps=9, log_every=2, eval_every=4, eval_batches=1, warmup_steps=1)
    records = {}
    for lag in (1, 4):
        monkeypatch.setattr(train_lib, "METRICS_LAG", lag)
        monkeypatch.setattr(train_lib, "_platform", lambda run, lag=lag: "cpu" if lag == 1 else "gpu")
        run = build(config, devices=jax.devices()[:1])
        history = fit(run, progress=False, log=lambda _: None)
        records[lag] = [r for r in history if "advice" not in r]  # advice depends on timing, not on the lag
    assert [r["step"] for r in records[4]] == [r["step"] for r in records[1]] == [0, 2, 4, 4, 6, 8, 8, 9, 9]
    throughput = {"tokens_per_sec", "mfu", "mfu_causal", "step_time_s"}
    for a, b in zip(records[1], records[4], strict=True):
        # with log steps closer than the lag, a window may close with no new step: no throughput then
        assert a.keys() - throughput == b.keys() - throughput
        for key in {"loss", "eval_loss", "grad_norm", "skipped_steps"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert throughput <= records[4][-2].keys()  # the last step's window always has steps


def test_accelerator_presets_default_to_the_measured_fast_paths():
    expected = {"gpt2-124m": ("none", "p=f32,c=bf16,o=bf16"), "llama-1b": ("dots_attention", "bf16")}
    for name, (remat, policy) in expected.items():
        cfg = preset(name)
        assert (cfg.model.scan_layers, cfg.remat.policy, cfg.precision.policy) == (False, remat, policy)
        kernels = (cfg.model.norm_kernel, cfg.model.loss_kernel, cfg.model.gelu_kernel, cfg.model.qkv_kernel)
        assert kernels == ("auto",) * 4
    assert apply_overrides(preset("gpt2-124m"), {"model.scan_layers": "true"}).model.scan_layers is True


def test_without_pallas_triton_backend_auto_takes_xla_and_pallas_is_a_config_error(monkeypatch):
    """jax 0.11 deprecated Pallas's Triton backend for removal. Without it (here: its import blocked), the
    kernels' 'auto' settings take XLA on GPUs, the decoder runs without importing it, and an explicit
    'pallas' names the missing backend."""
    import functools
    import sys

    import jax.experimental.pallas as pallas_pkg

    from dsjax.models import gelu, layers, norms, qkv, xent

    monkeypatch.delattr(pallas_pkg, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # the import raises ImportError
    monkeypatch.setattr(layers, "triton_available", functools.cache(layers.triton_available.__wrapped__))
    assert layers.triton_available() is False
    for module in (norms, gelu, qkv, xent):
        monkeypatch.setattr(module, "sharding_platform", lambda sharding: "gpu")
    monkeypatch.setattr(xent, "hopper_or_newer", lambda sharding=None: True)
    assert xent.resolve("auto", None, 50304, jnp.bfloat16, jnp.bfloat16) == "mosaic"  # Mosaic GPU, not Triton
    monkeypatch.setattr(xent, "hopper_or_newer", lambda sharding=None: False)
    assert norms.resolve("auto", 768) == gelu.resolve("auto", jnp.bfloat16) == qkv.resolve("auto") == "xla"
    assert xent.resolve("auto", None, 50304, jnp.bfloat16, jnp.bfloat16) == "xla"
    missing = r"model\.{}='pallas' is a Pallas kernel on Pallas's Triton backend, which jax \S+ does not have"
    for field, resolve in [
        ("norm_kernel", lambda: norms.resolve("pallas", 768)),
        ("gelu_kernel", lambda: gelu.resolve("pallas", jnp.bfloat16)),
        ("qkv_kernel", lambda: qkv.resolve("pallas")),
        ("loss_kernel", lambda: xent.resolve("pallas")),
    ]:
        with pytest.raises(ConfigError, match=missing.format(field)):
            resolve()

    losses = []
    for kernel in ("auto", "xla"):
        fields = {f"{name}_kernel": kernel for name in ("norm", "gelu", "qkv", "loss")}
        cfg = ModelConfig(**{**FAMILIES["gpt2"].__dict__, **fields})
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        losses.append(jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss_fn(g, p, BATCH, None)))(params)[0])
    assert losses[0] == losses[1]
