"""deploy/grafana/vitlens-dashboard.json: template variables, and queries that filter by them,
use Grafana's ``$__rate_interval``, name only metrics the server exports and parse as PromQL.

The exported metrics come from the server's own `Telemetry` (its registry's metric families),
never from a list kept here. The PromQL check uses ``promql-parser`` (PyPI); it is skipped
without it, except under CI, where a missing parser fails.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from vitlens_server.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/vitlens-dashboard.json"
FILTERS = {"namespace": ("=", "$namespace"), "job": ("=", "$job"), "pod": ("=~", "$pod")}
RATE_WINDOW = "$__rate_interval"
# What a series name may add to its family's name, by family type (text exposition format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
METRIC = re.compile(r"\b(vitlens_[a-z_]+)\b")
SELECTOR = re.compile(r"\b(vitlens_[a-z_]+)(\{[^}]*\})?")
WINDOW = re.compile(r"\[([^\]]*)\]")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def _variables() -> dict[str, dict]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _exported() -> set[str]:
    """Every series name the server's metrics can produce."""
    names = set()
    for family in Telemetry().registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def _promql():
    try:
        import promql_parser
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("promql-parser is not installed (dev extra) but CI must check PromQL")
        pytest.skip("promql-parser not installed")
    return promql_parser


def _concrete(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by values Prometheus accepts."""
    return (
        expr.replace(RATE_WINDOW, "1m")
        .replace("$namespace", "vitlens")
        .replace("$job", "vitlens")
        .replace("$pod", ".*")
    )


def test_the_template_variables() -> None:
    variables = _variables()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "pod"):
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] == "${datasource}", name
        assert f", {name})" in variable["query"] and variable["query"].startswith("label_values(")
    # each narrows the next: namespace -> job -> pod
    assert 'namespace="$namespace"' in variables["job"]["query"]
    assert 'job="$job"' in variables["pod"]["query"]
    assert variables["pod"]["multi"] and variables["pod"]["includeAll"]
    assert not variables["namespace"]["multi"] and not variables["job"]["multi"]


def test_every_panel_queries_the_chosen_datasource() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_every_window_is_the_rate_interval() -> None:
    for title, expr in _targets():
        windows = WINDOW.findall(expr)
        assert set(windows) <= {RATE_WINDOW}, (title, windows)
        if re.search(r"\b(rate|increase|irate)\(", expr):
            assert windows, (title, expr)
        assert " offset " not in expr and ":]" not in expr, (title, expr)  # no subqueries


def test_every_selector_filters_by_namespace_job_and_pod() -> None:
    for title, expr in _targets():
        selectors = SELECTOR.findall(expr)
        assert selectors, (title, expr)
        for metric, matchers in selectors:
            for label, (op, value) in FILTERS.items():
                assert f'{label}{op}"{value}"' in matchers, (title, metric, label)


def test_queries_name_only_metrics_the_server_exports() -> None:
    exported = _exported()
    assert "vitlens_requests_total" in exported and "vitlens_queue_wait_seconds_bucket" in exported
    queries = [expr for _, expr in _targets()]
    queries += [v["query"] for v in _variables().values() if v["type"] == "query"]
    used = {name for expr in queries for name in METRIC.findall(expr)}
    assert used <= exported, used - exported
    # and the dashboard charts every family the server has
    families = {f.name for f in Telemetry().registry.collect()}
    charted = {f for f in families if any(name.startswith(f) for name in used)}
    assert charted == families, families - charted


def test_every_rpc_has_its_rate_errors_and_latency() -> None:
    """Request rate, errors and latency are grouped by the rpc label and never restricted to
    some RPCs, so Evaluate and the Open Inference Protocol's RPCs show up like Explain."""
    by_rpc = [
        (title, expr)
        for title, expr in _targets()
        if re.search(r"by \((le, )?rpc(, code)?\)", expr) and 'rpc="' not in expr
    ]
    metrics = {name for _, expr in by_rpc for name in METRIC.findall(expr)}
    assert {"vitlens_requests_total", "vitlens_request_seconds_bucket"} <= metrics
    assert any('code!="OK"' in expr for _, expr in by_rpc)
    assert any("vitlens_in_flight_requests" in expr for _, expr in by_rpc)


def _parsed(promql, where: str, expr: str):
    """The syntax tree of ``expr`` (Grafana's variables filled in); fails naming ``where``."""
    try:
        return promql.parse(_concrete(expr))
    except ValueError as err:
        pytest.fail(f"{where}: {expr}: {err}")


def _nodes(promql, tree, kind: type) -> list:
    found: list = []
    promql.walk(tree, lambda node: found.append(node) if isinstance(node, kind) else None)
    return found


def test_panel_queries_parse_as_promql_with_the_filters_on_every_selector() -> None:
    promql = _promql()
    wanted = {(label, _concrete(value)) for label, (_, value) in FILTERS.items()}
    for title, expr in _targets():
        tree = _parsed(promql, title, expr)
        selectors = _nodes(promql, tree, promql.VectorSelector)
        assert selectors, (title, expr)
        for selector in selectors:
            matchers = {(m.name, m.value) for m in selector.matchers.matchers}
            assert wanted <= matchers, (title, str(selector))
        windows = {m.range.total_seconds() for m in _nodes(promql, tree, promql.MatrixSelector)}
        assert windows <= {60.0}, (title, windows)  # only $__rate_interval (filled in as 1m)


def test_variable_queries_parse_as_promql() -> None:
    promql = _promql()
    for name, variable in _variables().items():
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.*), \w+\)", variable["query"]).group(1)
            assert _nodes(promql, _parsed(promql, name, selector), promql.VectorSelector)
