"""The advisor: rules over a run's recent training records that name a concrete fix.

Each rule looks at the last few training records (metrics.jsonl keys, `dsjax.metrics.SCHEMA`) and returns
a sentence of advice or None: GPU utilisation under the seed's 70% floor, steps waiting on input, a
collapsing loss scale or frequent skipped steps, memory left over for a lighter remat policy, MFU far
below what the preset reached in experiments/RESULTS.md. `dsjax.monitor.Monitor` prints, logs and exports
what fires.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable

import jax.numpy as jnp

from dsjax.config import Config
from dsjax.precision import DynamicLossScale, loss_scale_from_config, parse_policy

# MFU that the accelerator presets reached on one H100 / H200 in bf16 (experiments/RESULTS.md); the
# advisor compares a run of the same model on the same kind of GPU against it.
RECORDED_MFU: dict[str, tuple[float, str]] = {
    "gpt2-124m": (0.375, "one H100, batch 32"),
    "llama-1b": (0.548, "one H100, batch 8"),
}
# A lighter remat policy to suggest when memory is left over (one that saves more activations).
LIGHTER_REMAT = {
    "full": "dots",
    "qkv_out": "dots",
    "dots": "dots_attention",
    "offload": "minimal",
    "dots_attention": "none",
    "minimal": "none",
}
GPU_UTILIZATION_FLOOR = 70.0  # percent; the seed's rule


class Advisor:
    """Rules over the recent training records; each returns advice (a sentence) or None. A rule fires
    when it starts returning advice and clears when it stops; `observe` returns those transitions."""

    def __init__(self, config: Config, device_kind: str, window: int = 3):
        self.config, self.device_kind = config, device_kind
        self.recent: collections.deque[dict] = collections.deque(maxlen=window)
        self.seen = 0
        self.active: set[str] = set()
        self.preset = self._preset()
        self.rules: dict[str, Callable[[list[dict]], str | None]] = {
            "gpu_utilization": self.gpu_utilization,
            "input_bound": self.input_bound,
            "loss_scale": self.loss_scale,
            "memory_headroom": self.memory_headroom,
            "mfu_below_benchmark": self.mfu_below_benchmark,
        }

    def _preset(self) -> str | None:
        from dsjax.config import preset

        for name in RECORDED_MFU:
            if preset(name).model == self.config.model:
                return name
        return None

    def observe(self, record: dict) -> list[tuple[str, str | None]]:
        """Feed one training record; returns [(rule, advice)] for rules that fired now and [(rule, None)]
        for rules that cleared. The first record is left out (its window holds the first execution), and
        the rules speak once two records are in."""
        self.seen += 1
        if self.seen > 1:
            self.recent.append(record)
        if len(self.recent) < 2:
            return []
        records = list(self.recent)
        changes = []
        for rule, check in self.rules.items():
            advice = check(records)
            if advice is not None and rule not in self.active:
                self.active.add(rule)
                changes.append((rule, advice))
            elif advice is None and rule in self.active:
                self.active.discard(rule)
                changes.append((rule, None))
        return changes

    def gpu_utilization(self, records: list[dict]) -> str | None:
        values = [r["gpu_utilization_pct"] for r in records if r.get("gpu_utilization_pct") is not None]
        if not values or statistics.fmean(values) >= GPU_UTILIZATION_FLOOR:
            return None
        mesh, last = self.config.mesh, records[-1]
        memory = ""
        if last.get("memory_peak_bytes") and last.get("memory_limit_bytes"):
            memory = (
                f" (the step peaks at {last['memory_peak_bytes'] / last['memory_limit_bytes']:.0%} of device memory)"
            )
        layout = (
            f" or give mesh.tensor={mesh.tensor}'s degree to mesh.fsdp / mesh.data (tensor parallelism waits on "
            "collectives every layer)"
            if mesh.tensor > 1
            else ""
        )
        return (
            f"GPU utilisation averaged {statistics.fmean(values):.0f}% over the last {len(values)} log windows, "
            f"under {GPU_UTILIZATION_FLOOR:.0f}%: the GPUs wait on something. Raise train.batch_size "
            f"(now {self.config.train.batch_size}){memory}{layout}; if the host is slow to make batches, see "
            "the input_bound advice."
        )

    def input_bound(self, records: list[dict]) -> str | None:
        first, last = records[0], records[-1]
        if "data_wait_s" not in last or last["wall_s"] <= first["wall_s"]:  # the deltas of len(records) - 1 windows
            return None
        share = (last["data_wait_s"] - first["data_wait_s"]) / (last["wall_s"] - first["wall_s"])
        if share <= 0.1:
            return None
        return (
            f"the device waited {share:.0%} of the last log windows for the host to build batches: the steps are "
            "input-bound. "
            "Use pre-tokenized data (--data.source=tokens) instead of tokenizing text on the fly, or a larger "
            "train.batch_size so each step does more work per batch."
        )

    def loss_scale(self, records: list[dict]) -> str | None:
        first, last = records[0], records[-1]
        if "skipped_steps" not in last or last["step"] <= first["step"]:
            return None
        skipped, steps = last["skipped_steps"] - first["skipped_steps"], last["step"] - first["step"]
        precision, t = self.config.precision, self.config.train
        dynamic = isinstance(loss_scale_from_config(precision), DynamicLossScale)
        floored = dynamic and last.get("loss_scale") is not None and last["loss_scale"] <= precision.min_scale
        if skipped / steps <= 0.05 and not (floored and skipped):
            return None
        common = f"Lower train.lr (now {t.lr:g}) or raise train.warmup_steps (now {t.warmup_steps})"
        if not dynamic:  # no loss scale to blame: the gradients themselves are not finite
            return (
                f"{skipped} of the last {steps} steps were skipped for non-finite gradients (precision.policy="
                f"{precision.policy}, no loss scaling): the training is unstable. {common}, check the data, or "
                "let --checkpoint.rollback_on_nonfinite=true step back past bad batches."
            )
        return (
            f"{skipped} of the last {steps} steps were skipped for non-finite gradients and the loss scale is "
            f"{last['loss_scale']:g} (precision.min_scale = {precision.min_scale:g}): fp16 is overflowing. "
            f"{common}, or train in bf16 (--precision.policy=bf16), which needs no loss scale."
        )

    def memory_headroom(self, records: list[dict]) -> str | None:
        last, policy = records[-1], self.config.remat.policy
        peak, limit = last.get("memory_peak_bytes"), last.get("memory_limit_bytes")
        if not peak or not limit or policy not in LIGHTER_REMAT or peak > 0.5 * limit:
            return None
        return (
            f"the step peaks at {peak / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB per device ({peak / limit:.0%}) "
            f"with remat.policy={policy}: there is room to recompute less. Try "
            f"--remat.policy={LIGHTER_REMAT[policy]} (or a larger train.batch_size); --dry-run shows the "
            "compiled memory first."
        )

    def mfu_below_benchmark(self, records: list[dict]) -> str | None:
        if self.preset is None or not any(k in self.device_kind for k in ("H100", "H200")):
            return None
        values = [r["mfu"] for r in records if r.get("mfu") is not None]
        recorded, where = RECORDED_MFU[self.preset]
        policy = parse_policy(self.config.precision.policy)  # the presets': bf16 compute, fp32 master weights
        bf16 = policy.compute == jnp.bfloat16 and policy.param == jnp.float32
        if not values or not bf16 or statistics.median(values) >= 0.7 * recorded:
            return None
        return (
            f"MFU is {statistics.median(values):.1%}, far below the {recorded:.1%} the {self.preset} preset "
            f"reached in experiments/RESULTS.md ({where}). Check train.batch_size, remat.policy and "
            "model.attention (cudnn), and that no other process shares the GPU."
        )
