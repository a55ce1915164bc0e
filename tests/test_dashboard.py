"""monitoring/: the Grafana dashboard queries only metrics dsjax exports, each filtered on the run
variable, and covers the panels the README promises; prometheus.yml is valid YAML."""

import json
import re
from pathlib import Path

import pytest

from dsjax.metrics import SCHEMA

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
EXPORTED = {"dsjax_" + f.prom for f in SCHEMA if f.prom} | {"dsjax_advice"}
# A metric name and the label selector that follows it, if any.
SELECTOR = re.compile(r"(dsjax_[a-z0-9_]+)\s*(\{[^}]*\})?")


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their panels when collapsed


@pytest.fixture(scope="module")
def dashboard():
    return json.loads((MONITORING / "grafana" / "dsjax.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def targets(dashboard):
    found = [(p["title"], t["expr"]) for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert found, "the dashboard has no queries"
    return found


def test_queries_name_exported_metrics_and_filter_on_run(targets):
    for title, expr in targets:
        selectors = SELECTOR.findall(expr)
        assert selectors, f"panel {title!r}: query {expr!r} names no dsjax metric"
        for name, labels in selectors:
            assert name in EXPORTED, f"panel {title!r}: {name} is not exported (not in dsjax.metrics.SCHEMA)"
            assert re.search(r'\brun=~"\$run"', labels), f'panel {title!r}: {name} is not filtered on run=~"$run"'


def test_expected_panels_are_there(targets):
    referenced = {name for _, expr in targets for name, _ in SELECTOR.findall(expr)}
    expected = {
        "throughput": "dsjax_tokens_per_second",
        "MFU": "dsjax_mfu",
        "causal MFU": "dsjax_mfu_causal",
        "loss": "dsjax_loss",
        "eval loss": "dsjax_eval_loss",
        "step time": "dsjax_step_time_seconds",
        "GPU utilization": "dsjax_gpu_utilization_percent",
        "GPU power": "dsjax_gpu_power_watts",
        "GPU temperature": "dsjax_gpu_temperature_celsius",
        "GPU memory": "dsjax_gpu_memory_used_bytes",
        "device memory in use": "dsjax_memory_in_use_bytes",
        "device memory peak": "dsjax_memory_peak_bytes",
        "device memory limit": "dsjax_memory_limit_bytes",
        "goodput": "dsjax_goodput",
        "loss scale": "dsjax_loss_scale",
        "skipped steps": "dsjax_skipped_steps",
        "learning rate": "dsjax_learning_rate",
        "gradient norm": "dsjax_grad_norm",
        "advice": "dsjax_advice",
    }
    breakdown = ("productive", "setup", "compile", "checkpoint", "data_wait", "eval", "restart")
    expected |= {f"time breakdown: {b}": f"dsjax_{b}_seconds" for b in breakdown}
    missing = {panel: name for panel, name in expected.items() if name not in referenced}
    assert not missing, f"no panel queries {missing}"
    assert any('device=~"gpu.*"' in expr for _, expr in targets if "dsjax_gpu_utilization_percent" in expr)


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["definition"] == "label_values(dsjax_step, run)"
    for var in variables.values():
        for name in re.findall(r"dsjax_[a-z0-9_]+", json.dumps(var.get("query", ""))):
            assert name in EXPORTED, f"template variable {var['name']!r} queries {name}, which is not exported"


def test_prometheus_config_parses():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in config["scrape_configs"] for s in job.get("static_configs", []) for t in s["targets"]]
    assert "localhost:9400" in targets
