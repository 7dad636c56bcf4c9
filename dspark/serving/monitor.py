"""Serving metrics from engine steps: speculation counters, latencies, queue, verification budget.

`ServingMonitor` turns what each step did into metric updates for a `MetricsSink` (Ray's metrics in the
deployment, which the dashboard and the Prometheus endpoint show; a recording sink in tests). It also keeps
the short-window load summary that request routing and autoscaling read from each replica.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel

from dspark.engine import Engine, RequestOutput

TAU_BUCKETS = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0]
LATENCY_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24]

# name -> (kind, description, histogram boundaries)
METRICS: dict[str, tuple[str, str, list[float] | None]] = {
    "dspark_output_tokens": ("counter", "tokens streamed to clients", None),
    "dspark_drafted_tokens": ("counter", "draft tokens verified, by draft position", None),
    "dspark_accepted_tokens": ("counter", "draft tokens accepted, by draft position", None),
    "dspark_no_speculation_fallbacks": (
        "counter", "steps where requests could speculate but the policy verified no draft", None
    ),
    "dspark_drafter_fallbacks": (
        "counter", "requests decoded without drafts: the draft worker failed or missed its deadline", None
    ),
    "dspark_prefix_cache_queries": ("counter", "prompt tokens looked up in the prefix cache", None),
    "dspark_prefix_cache_hits": ("counter", "prompt tokens reused from the prefix cache (no prefill)", None),
    "dspark_request_tau": ("histogram", "tokens per verification step of finished requests", TAU_BUCKETS),
    "dspark_verification_budget": ("gauge", "mean draft tokens verified per speculating request", None),
    "dspark_budget_squeeze": ("gauge", "share of offered speculation the scheduler cut (recent steps)", None),
    "dspark_ttft_seconds": ("histogram", "time to first token", LATENCY_BUCKETS_S),
    "dspark_inter_token_latency_seconds": ("histogram", "time per output token after the first",
                                           LATENCY_BUCKETS_S),
    "dspark_queue_length": ("gauge", "requests waiting for a KV slot", None),
    "dspark_running_requests": ("gauge", "requests in the continuous batch", None),
}  # fmt: skip


class MetricsSink(Protocol):
    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        """Counter: add value; gauge: set it; histogram: observe it (the kind comes from METRICS)."""
        ...


class LoadSummary(BaseModel):
    """A replica's recent load, reported to the request router and the autoscaler."""

    running: int
    waiting: int
    verification_budget: float  # mean draft tokens verified per speculating request, recent steps
    budget_squeeze: float  # 0: the policy verified what was offered; 1: it cut all speculation

    @property
    def expected_load(self) -> float:
        """Target tokens per step this replica will process: every request feeds 1 + its budget."""
        return (self.running + self.waiting) * (1.0 + self.verification_budget)


class ServingMonitor:
    def __init__(self, sink: MetricsSink, window: int = 64) -> None:
        self.sink = sink
        self._arrivals: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=window)  # could_draft, verified, squeeze
        self._load = LoadSummary(running=0, waiting=0, verification_budget=0.0, budget_squeeze=0.0)

    def on_arrival(self, request_id: str, now: float | None = None) -> None:
        self._arrivals[request_id] = time.perf_counter() if now is None else now

    def on_step(self, engine: Engine, outputs: Sequence[RequestOutput], now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        for out in outputs:
            self._latencies(out, now)
            if out.finished and out.spec is not None and out.spec.steps:
                self.sink.record("dspark_request_tau", out.spec.tau)
        self._speculation(engine)
        step = engine.last_step
        self.sink.record("dspark_queue_length", step.waiting)
        self.sink.record("dspark_running_requests", step.running)
        if step.prefix_queried:
            self.sink.record("dspark_prefix_cache_queries", step.prefix_queried)
        if step.prefix_hits:
            self.sink.record("dspark_prefix_cache_hits", step.prefix_hits)

    def load(self) -> LoadSummary:
        return self._load

    def _latencies(self, out: RequestOutput, now: float) -> None:
        rid = out.request_id
        if out.token_ids:
            self.sink.record("dspark_output_tokens", len(out.token_ids))
            previous = self._last_token.get(rid)
            if previous is None and rid in self._arrivals:
                self.sink.record("dspark_ttft_seconds", now - self._arrivals[rid])
            elif previous is not None:
                per_token = (now - previous) / len(out.token_ids)
                for _ in out.token_ids:
                    self.sink.record("dspark_inter_token_latency_seconds", per_token)
            self._last_token[rid] = now
        if out.finished:
            self._arrivals.pop(rid, None)
            self._last_token.pop(rid, None)

    def _speculation(self, engine: Engine) -> None:
        step = engine.last_step
        for j, (drafted, accepted) in enumerate(
            zip(step.spec.drafted_at, step.spec.accepted_at, strict=True)
        ):
            tags = {"position": str(j)}
            if drafted:
                self.sink.record("dspark_drafted_tokens", drafted, tags)
            if accepted:
                self.sink.record("dspark_accepted_tokens", accepted, tags)
        step = engine.last_step
        if step.drafter_fallbacks:
            self.sink.record("dspark_drafter_fallbacks", step.drafter_fallbacks)
        if step.could_draft:
            if step.verified == 0 and not step.drafter_fallbacks:
                self.sink.record("dspark_no_speculation_fallbacks", 1)
            self._steps.append((step.could_draft, step.verified, step.squeeze))
        speculating = sum(c for c, _, _ in self._steps)
        budget = sum(v for _, v, _ in self._steps) / speculating if speculating else 0.0
        squeeze = sum(s for _, _, s in self._steps) / len(self._steps) if self._steps else 0.0
        self._load = LoadSummary(
            running=step.running, waiting=step.waiting, verification_budget=budget, budget_squeeze=squeeze
        )
        self.sink.record("dspark_verification_budget", budget)
        self.sink.record("dspark_budget_squeeze", squeeze)
