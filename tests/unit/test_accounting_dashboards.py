"""Grafana dashboards: every PromQL expression uses only metrics the code exports."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
from labfleet_accounting import db, metrics
from labfleet_accounting.gpu_exporter import GpuCollector
from labfleet_accounting.metrics import LedgerMetrics
from prometheus_client.core import CounterMetricFamily

DASHBOARDS = ["platform.json", "group.json"]
# PromQL words that look like identifiers but are functions, keywords or aggregations
_WORD = re.compile(r"\b(labfleet_[a-z0-9_]+)\b")


class NoGpus:
    errors = 0

    def sample(self):
        return []


def exported(tmp_path) -> set[str]:
    """Names as Prometheus stores them (counters with ``_total``), from the collectors."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db.upgrade(engine)
    families = [*LedgerMetrics(engine).collect(), *GpuCollector(NoGpus(), None).collect()]
    engine.dispose()
    return {f.name + "_total" if isinstance(f, CounterMetricFamily) else f.name for f in families}


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_uses_only_exported_metrics(name, tmp_path):
    text = resources.files("labfleet_accounting").joinpath("dashboards", name).read_text()
    dashboard = json.loads(text)
    known = exported(tmp_path)
    exprs = expressions(dashboard)
    assert len(exprs) >= 8
    used = set()
    for expr in exprs:
        names = set(_WORD.findall(expr))
        assert names, f"{name}: {expr!r} reads no labfleet metric"
        assert names <= known, f"{name}: {expr!r} uses {sorted(names - known)}"
        assert expr.count("(") == expr.count(")"), expr
        used |= names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"].startswith("labfleet-")
    if name == "group.json":
        # the group view is filtered by the chosen group everywhere
        assert all('group="$group"' in e for e in exprs if "label_values" not in e)


def test_every_exported_metric_is_documented_and_shown(tmp_path):
    known = exported(tmp_path)
    for name in known:
        assert name.removesuffix("_total") in metrics.__doc__, f"{name} not in the docstring"
    shown = set()
    for name in DASHBOARDS:
        text = resources.files("labfleet_accounting").joinpath("dashboards", name).read_text()
        shown |= set(_WORD.findall(text))
    assert known - shown == set(), "exported but on no dashboard"
