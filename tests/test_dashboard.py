"""The Grafana dashboard in docs/grafana queries only metrics that exist.

A dashboard that names a metric nobody exports shows "No data" without an error, so a renamed
counter would go unnoticed by operators. The fast tests check every name against what the plugin
declares and what vLLM's installed source defines; the engine test against a real `/metrics`.
"""

import copy
import importlib.util
import json
import re
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.test_server import (
    metric_samples,
    server,  # noqa: F401 (the server fixture, started for this module)
)
from vllm_lookahead import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "vllm-lookahead.json"
# Metric names contain colons; the only `vllm:` tokens in a PromQL expression are metric names.
METRIC_NAME = re.compile(r"vllm:[A-Za-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        # A collapsed row keeps its panels inside it.
        yield from _panels(panel.get("panels", []))


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries (those
    query metrics too, and an empty variable empties every panel)."""
    exprs = [target["expr"] for panel in _panels(dashboard["panels"])
             for target in panel.get("targets", []) if "expr" in target]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def queried_metrics(dashboard: dict) -> set[str]:
    return {name for expr in queries(dashboard) for name in METRIC_NAME.findall(expr)}


@cache
def plugin_samples() -> frozenset[str]:
    """The sample names the plugin's exporter can put on /metrics, suffixes included: a gauge
    queried as `_total` is as wrong as a misspelt name."""
    counters = [name for name, _ in (*metrics.COUNTERS.values(), *metrics.BY_SOURCE.values())]
    gauges = [name for name, _ in metrics.GAUGES.values()]
    samples = {f"{metrics.PREFIX}{name}_total" for name in counters}
    samples |= {metrics.PREFIX + name for name in [*gauges, "config_info"]}
    samples |= {f"{metrics.PREFIX}chain_length{suffix}" for suffix in HISTOGRAM_SUFFIXES}
    return frozenset(samples)


@cache
def vllm_metrics_source() -> str:
    # find_spec locates the package without importing it (importing vLLM takes seconds).
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    files = [*sorted((root / "v1" / "metrics").glob("*.py")),
             root / "v1" / "spec_decode" / "metrics.py"]
    return "\n".join(f.read_text() for f in files)


def _defined_by_vllm(name: str) -> bool:
    base = name.removeprefix("vllm:")
    # The exposition adds `_total` to counters and `_bucket`/`_sum`/`_count` to histograms;
    # vLLM's source names the family without them (though some families end in `_total`).
    candidates = {base, base.removesuffix("_total")}
    candidates |= {base.removesuffix(s) for s in HISTOGRAM_SUFFIXES if base.endswith(s)}
    source = vllm_metrics_source()
    # Whole identifiers only: `generation_tokens` must not match `request_generation_tokens`.
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(c)}(?![A-Za-z0-9_])", source)
               for c in candidates)


def unknown_metrics(dashboard: dict) -> list[str]:
    """The `vllm:` names the dashboard queries that neither the plugin nor vLLM exports."""
    unknown = []
    for name in sorted(queried_metrics(dashboard)):
        if name.startswith(metrics.PREFIX):
            if name not in plugin_samples():
                unknown.append(name)
        elif not _defined_by_vllm(name):
            unknown.append(name)
    return unknown


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = load_dashboard()
    assert dashboard["title"] == "vLLM + lookahead"
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    for expr in queries(dashboard):
        # A cheap stand-in for a PromQL parser: Grafana only reports a syntax error on display.
        assert expr.count("(") == expr.count(")"), expr
        # Every selector follows the variables, or choosing a model would not change the panel.
        for selector in re.findall(r"vllm:[A-Za-z0-9_]+\{([^}]*)\}", expr):
            if "label_values" not in expr:
                assert 'model_name=~"$model_name"' in selector, expr


def test_dashboard_queries_only_declared_metrics():
    dashboard = load_dashboard()
    names = queried_metrics(dashboard)
    # Guards the extraction itself: an empty set would pass vacuously.
    assert {"vllm:spec_decode_num_accepted_tokens_total",
            "vllm:lookahead_chain_length_bucket"} <= names
    assert unknown_metrics(dashboard) == []


def test_unknown_metrics_reports_misspelt_and_mistyped_names():
    dashboard = copy.deepcopy(load_dashboard())
    target = dashboard["panels"][0]["targets"][0]
    target["expr"] += (" + vllm:lookahead_bogus_total + vllm:spec_decode_num_bogus_total"
                       " + vllm:lookahead_pool_bytes_total + vllm:lookahead_steps")
    assert unknown_metrics(dashboard) == [
        "vllm:lookahead_bogus_total", "vllm:lookahead_pool_bytes_total", "vllm:lookahead_steps",
        "vllm:spec_decode_num_bogus_total"]


def scrape(port: int) -> set[str]:
    return {name for name, _ in metric_samples(port) if name.startswith("vllm:")}


@pytest.mark.engine
def test_every_queried_metric_is_on_the_servers_metrics_endpoint(server, prompts):  # noqa: F811
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    model = client.models.list().data[0].id
    for prompt in prompts[:4]:
        client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    wanted = queried_metrics(load_dashboard())
    # The worker writes the drafter's totals when the engine goes idle, just after the last
    # response: give that file a moment to appear.
    for _ in range(50):
        missing = wanted - scrape(server)
        if not missing:
            break
        time.sleep(0.2)
    assert not missing, sorted(missing)
