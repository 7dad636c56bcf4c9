"""The Grafana dashboard queries exactly the metrics the replicas export (Ray prefixes `ray_`, counters end
in `_total`, histograms export `_bucket/_sum/_count`), and shows every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dspark.serving.monitor import METRICS

DASHBOARD = Path(__file__).resolve().parents[1] / "deployments" / "grafana" / "dspark_dashboard.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _queried(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {m for e in exprs for m in re.findall(r"\bray_dspark_\w+", e)}


def test_dashboard_queries_only_exported_metrics_and_all_of_them():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {f"ray_{name}{suffix}" for name, (kind, _, _) in METRICS.items() for suffix in SUFFIXES[kind]}
    queried = _queried(dashboard)
    assert queried <= exported, queried - exported
    shown = {name for name in METRICS if any(q.startswith(f"ray_{name}") for q in queried)}
    assert shown == set(METRICS)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
