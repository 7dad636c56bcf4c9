"""Serving metrics from engine steps, the replicas' load summary, and the decisions built on it
(expected-load routing, budget-aware autoscaling), checked against hand-computed values."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from deployments.autoscaling import SQUEEZED_PERIODS, squeezed_decision
from deployments.router import ExpectedLoadRouter
from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.engine.prefix_cache import BLOCK_TOKENS
from dspark.engine.stats import StepReport
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig
from dspark.serving.monitor import METRICS, LoadSummary, ServingMonitor


class RecordingSink:
    def __init__(self) -> None:
        self.values: dict[tuple, list[float]] = defaultdict(list)

    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        assert name in METRICS, name
        assert METRICS[name][0] != "counter" or value > 0, f"{name} += {value}: Ray raises on that"
        self.values[(name, tuple(sorted((tags or {}).items())))].append(value)

    def total(self, name: str) -> float:
        return sum(sum(v) for (n, _), v in self.values.items() if n == name)

    def by_position(self, name: str) -> dict[int, float]:
        return {int(dict(t)["position"]): sum(v) for (n, t), v in self.values.items() if n == name}


def test_step_report_squeeze():
    assert StepReport(could_draft=2, offered=8, verified=2).squeeze == pytest.approx(0.75)
    assert StepReport(could_draft=2, gated=True).squeeze == 1.0
    assert StepReport(could_draft=0).squeeze == 0.0


def test_monitor_counts_match_the_engine(default_model, tokenizer):
    sink = RecordingSink()
    monitor = ServingMonitor(sink)
    config = EngineConfig(
        max_batch_size=2,
        proposer="ngram",
        num_speculative_tokens=4,
        verification=VerificationConfig(policy="fixed"),
    )
    engine = build_engine(config, model=default_model, tokenizer=tokenizer)
    prompt = "Repeat exactly: red green blue, red green blue, red green blue, red green blue."
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=30)) for _ in range(2)]
    clock = 0.0
    for rid in ids:
        monitor.on_arrival(rid, now=clock)
    tokens = 0
    while engine.has_unfinished():
        outputs = engine.step()
        clock += 0.05  # every step takes 50 ms on this clock
        monitor.on_step(engine, outputs, now=clock)
        tokens += sum(len(o.token_ids) for o in outputs)
    stats = engine.stats
    assert sink.by_position("dspark_drafted_tokens") == {j: n for j, n in enumerate(stats.drafted_at) if n}
    assert sink.total("dspark_accepted_tokens") == stats.accepted
    assert sink.values[("dspark_ttft_seconds", ())] == [pytest.approx(0.05)] * 2  # prompt fits one step
    itl = sink.values[("dspark_inter_token_latency_seconds", ())]
    assert len(itl) == tokens - 2  # every token after each request's first
    assert all(0 < v <= 0.05 + 1e-9 for v in itl)  # several tokens per 50 ms step share it
    assert len(sink.values[("dspark_request_tau", ())]) == 2
    load = monitor.load()
    assert load.running == 2 and load.waiting == 0  # the last step's view, before finished requests left
    assert 0 < load.verification_budget <= 4

    # Both prompts started prefill in the same step, before either was cached; a third one reuses them.
    assert sink.total("dspark_prefix_cache_queries") == 2 * len(engine.encode_prompt(prompt))
    assert sink.total("dspark_prefix_cache_hits") == 0
    engine.add_request(prompt, SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        monitor.on_step(engine, engine.step())
    reusable = (len(engine.encode_prompt(prompt)) - 1) // BLOCK_TOKENS * BLOCK_TOKENS  # the last one computes
    assert reusable and sink.total("dspark_prefix_cache_hits") == reusable


def test_expected_load_and_router_ranking():
    idle = LoadSummary(running=0, waiting=0, verification_budget=0.0, budget_squeeze=0.0)
    speculating = LoadSummary(running=4, waiting=0, verification_budget=3.0, budget_squeeze=0.0)
    plain = LoadSummary(running=4, waiting=2, verification_budget=0.0, budget_squeeze=1.0)
    assert idle.expected_load == 0
    assert speculating.expected_load == 16  # 4 requests x (1 + 3) tokens per step
    assert plain.expected_load == 6

    class Replica:  # what the router reads of a RunningReplica
        def __init__(self, name: str, load: LoadSummary | None) -> None:
            self.name, self.routing_stats = name, load.model_dump() if load else {}

    replicas = [Replica("speculating", speculating), Replica("plain", plain), Replica("new", None),
                Replica("idle", idle)]  # fmt: skip
    ranks = asyncio.run(ExpectedLoadRouter.choose_replicas(None, replicas))  # type: ignore[arg-type]
    assert [[r.name for r in rank] for rank in ranks] == [["new", "idle"], ["plain", "speculating"]]


def test_squeezed_decision_scales_out_only_when_squeeze_persists_under_load():
    # Queue-based default says 2; squeezed but nearly idle: no change.
    assert squeezed_decision(2, 2, 4, squeeze=0.9, ongoing_per_replica=1.0, periods=0) == (2, 0)
    periods = 0
    for _ in range(SQUEEZED_PERIODS - 1):
        replicas, periods = squeezed_decision(2, 2, 4, squeeze=0.9, ongoing_per_replica=6.0, periods=periods)
        assert replicas == 2
    assert squeezed_decision(2, 2, 4, squeeze=0.9, ongoing_per_replica=6.0, periods=periods) == (3, 0)
    assert squeezed_decision(4, 4, 4, squeeze=0.9, ongoing_per_replica=6.0, periods=9)[0] == 4  # at the cap
    assert squeezed_decision(3, 2, 4, squeeze=0.1, ongoing_per_replica=6.0, periods=9) == (3, 0)  # calm
