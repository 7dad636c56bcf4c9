"""`dspark bench-load`: verification policies under closed-loop load, in process.

At each concurrency c, c clients each keep one request in flight and send the next prompt when theirs
finishes, until `requests` have been served. Every policy runs on the same engine (one proposer, one
code path; only the policy object changes) over the same prompts, greedy, so all policies produce the
same tokens and differ only in time. Runs are interleaved per concurrency and repeated; the report keeps
the median repeat. Writes JSON and two PNGs: the throughput / per-user speed frontier, and the mean
verification length per request against concurrency.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from dspark.engine import Engine, EngineConfig
from dspark.engine.config import ProposerName
from dspark.prompts import load_prompts, write_json
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig, build_policy
from dspark.scheduling.policies import PolicyName

log = logging.getLogger(__name__)


class LoadBenchConfig(BaseModel):
    prompts: str | None = None
    concurrency: list[int] = [1, 2, 4, 8, 16, 32]
    policies: list[PolicyName] = ["none", "fixed", "threshold", "scheduler"]
    proposer: ProposerName = "ngram"
    drafter: str = "default"
    gamma: int = Field(4, ge=1, description="draft length: what 'fixed' verifies, the most others may")
    threshold: float = Field(0.3, gt=0, lt=1)
    requests_per_client: int = Field(2, ge=1)
    min_requests: int = Field(8, ge=1, description="at least this many requests per run (low concurrency)")
    max_tokens: int = Field(96, ge=1)
    repeats: int = Field(2, ge=1)
    model: str = "default"
    threads: int | None = None
    output: str = "results/load.json"


@dataclass
class _Trace:
    submitted: float
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in the delta)
    finished: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.token_times)


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if values else 0.0


def closed_loop(engine: Engine, prompts: list[list[int]], concurrency: int, num_requests: int,
                params: SamplingParams) -> dict:  # fmt: skip
    """Serve `num_requests` prompts with `concurrency` clients in flight; return latency and rate metrics."""
    engine.stats = type(engine.stats)()
    traces: dict[str, _Trace] = {}
    next_prompt = 0

    def submit() -> None:
        nonlocal next_prompt
        request_id = engine.add_request(prompts[next_prompt % len(prompts)], params)
        traces[request_id] = _Trace(time.perf_counter())
        next_prompt += 1

    began = time.perf_counter()
    for _ in range(min(concurrency, num_requests)):
        submit()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            trace = traces[out.request_id]
            if out.token_ids:
                trace.token_times.append((now, len(out.token_ids)))
            if out.finished:
                trace.finished = now
                if next_prompt < num_requests:
                    submit()
    return _metrics(list(traces.values()), time.perf_counter() - began, engine)


def _metrics(traces: list[_Trace], wall: float, engine: Engine) -> dict:
    tokens = sum(t.num_tokens for t in traces)
    per_user = [t.num_tokens / (t.finished - t.submitted) for t in traces]
    ttft = [t.token_times[0][0] - t.submitted for t in traces if t.token_times]
    gaps = [b[0] - a[0] for t in traces for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    stats = engine.stats
    return {
        "requests": len(traces),
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "throughput_tokens_per_s": round(tokens / wall, 2),
        "per_user_tokens_per_s": {
            "median": _percentile(per_user, 50),
            "p5": _percentile(per_user, 5),
            "p95": _percentile(per_user, 95),
        },
        "ttft_s": {"p50": _percentile(ttft, 50), "p95": _percentile(ttft, 95)},
        "inter_token_latency_s": {"p50": _percentile(gaps, 50), "p95": _percentile(gaps, 95)},
        "mean_verification_length": round(stats.drafted / stats.steps, 4) if stats.steps else 0.0,
        "tau": round(stats.tau, 4),
        "acceptance_rate": round(stats.acceptance_rate, 4),
    }


def _median_run(runs: list[dict]) -> dict:
    """The repeat with the median aggregate throughput (a real run, not a blend of several)."""
    ordered = sorted(runs, key=lambda r: r["throughput_tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["throughput_repeats"] = [r["throughput_tokens_per_s"] for r in runs]
    return chosen


def run_load_bench(config: LoadBenchConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    engine_config = EngineConfig(
        model=config.model, proposer=config.proposer, drafter=config.drafter,
        num_speculative_tokens=config.gamma, max_batch_size=max(config.concurrency), max_model_len=1536,
        verification=VerificationConfig(policy="scheduler", threshold=config.threshold),
    )  # fmt: skip
    engine = Engine(engine_config)
    policies = {name: _policy(engine, config, name) for name in config.policies}
    records = load_prompts(config.prompts)
    prompts = [engine.encode_prompt(messages=[{"role": "user", "content": r.turns[0]}]) for r in records]
    params = SamplingParams(max_tokens=config.max_tokens)

    engine.policy = policies.get("fixed", next(iter(policies.values())))
    closed_loop(engine, prompts[-4:], 2, 4, params)  # warm-up (and first estimator fits), unreported
    results: dict[str, dict[int, list[dict]]] = {p: {c: [] for c in config.concurrency} for p in policies}
    for c in config.concurrency:
        num_requests = max(config.min_requests, c * config.requests_per_client)
        for repeat in range(config.repeats):
            order = list(policies)
            order = order[repeat % len(order) :] + order[: repeat % len(order)]  # rotate: no fixed position
            for name in order:
                engine.policy = policies[name]
                run = closed_loop(engine, prompts, c, num_requests, params)
                results[name][c].append(run)
                log.info("c=%d %s: %.1f tok/s, per-user %.1f, verify %.2f, tau %.2f", c, name,
                         run["throughput_tokens_per_s"], run["per_user_tokens_per_s"]["median"],
                         run["mean_verification_length"], run["tau"])  # fmt: skip
    report = _report(config, policies, results)
    write_json(config.output, report)
    plot_load(report, Path(config.output))
    return report


def _policy(engine: Engine, config: LoadBenchConfig, name: str):
    if name == "scheduler":
        return engine.policy  # built with the engine: it holds the measured cost profile
    return build_policy(VerificationConfig(policy=name, threshold=config.threshold), None)


def _paired_ratios(results: dict[str, dict[int, list[dict]]], c: int) -> dict:
    """Scheduler against the better of none and fixed, per repeat (the runs of a repeat are adjacent in
    time, so a slow spell hits them alike), then the median over repeats; likewise per-user vs fixed."""

    def rate(name: str, i: int) -> float:
        return results[name][c][i]["throughput_tokens_per_s"]

    def per_user(name: str, i: int) -> float:
        return results[name][c][i]["per_user_tokens_per_s"]["median"]

    repeats = range(len(results["scheduler"][c]))
    vs_best = [rate("scheduler", i) / max(rate("none", i), rate("fixed", i)) for i in repeats]
    vs_fixed_user = [per_user("scheduler", i) / per_user("fixed", i) for i in repeats]
    return {
        "scheduler_vs_best_of_none_and_fixed": round(statistics.median(vs_best), 3),
        "scheduler_per_user_vs_fixed": round(statistics.median(vs_fixed_user), 3),
        "per_repeat_vs_best": [round(x, 3) for x in vs_best],
    }


def _report(config: LoadBenchConfig, policies: dict, results: dict[str, dict[int, list[dict]]]) -> dict:
    summary = {
        name: {str(c): _median_run(runs) for c, runs in by_c.items()} for name, by_c in results.items()
    }
    comparison = {}
    if {"none", "fixed", "scheduler"} <= set(summary):
        comparison = {str(c): _paired_ratios(results, c) for c in config.concurrency}
    return {
        "config": config.model_dump(),
        "threads": torch.get_num_threads(),
        "cost_profile": policies["scheduler"].profile.model_dump() if "scheduler" in policies else None,
        "comparison": comparison,
        "policies": summary,
        "all_runs": results,
    }


def plot_load(report: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(suffix: str, draw, **labels) -> None:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for name, by_c in report["policies"].items():
            draw(ax, name, by_c)
        ax.set(**labels)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output.with_name(f"{output.stem}_{suffix}.png"), dpi=120)
        plt.close(fig)

    def frontier(ax, name: str, by_c: dict) -> None:
        xs = [run["per_user_tokens_per_s"]["median"] for run in by_c.values()]
        ys = [run["throughput_tokens_per_s"] for run in by_c.values()]
        ax.plot(xs, ys, marker="o", label=name)
        for c, x, y in zip(by_c, xs, ys, strict=True):
            ax.annotate(c, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))

    def budget(ax, name: str, by_c: dict) -> None:
        ax.plot([int(c) for c in by_c], [run["mean_verification_length"] for run in by_c.values()],
                marker="o", label=name)  # fmt: skip
        ax.set_xscale("log", base=2)

    figure("frontier", frontier, xlabel="tokens/s per user (median)", ylabel="aggregate output tokens/s",
           title="Throughput frontier (labels: concurrency)")  # fmt: skip
    figure("budget", budget, xlabel="concurrency", ylabel="draft tokens verified per request-step",
           title="Mean verification budget per request")  # fmt: skip
