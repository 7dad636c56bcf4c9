"""The serving metrics (dspark.serving.monitor.METRICS) as Ray metrics: they show in the Ray dashboard and
on every node's Prometheus endpoint, tagged with the Serve deployment and replica."""

from __future__ import annotations

from ray.util import metrics

from dspark.serving.monitor import METRICS

_TAGGED = {"dspark_drafted_tokens": ("position",), "dspark_accepted_tokens": ("position",)}


class RayMetricsSink:
    def __init__(self) -> None:
        self._metrics = {}
        for name, (kind, description, boundaries) in METRICS.items():
            tags = _TAGGED.get(name, ())
            if kind == "counter":
                self._metrics[name] = metrics.Counter(name, description, tag_keys=tags)
            elif kind == "gauge":
                self._metrics[name] = metrics.Gauge(name, description, tag_keys=tags)
            else:
                self._metrics[name] = metrics.Histogram(name, description, boundaries, tag_keys=tags)

    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        metric = self._metrics[name]
        if isinstance(metric, metrics.Counter):
            if value > 0:  # Ray refuses (raises on) a counter increment of 0
                metric.inc(value, tags=tags)
        elif isinstance(metric, metrics.Gauge):
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
