"""`dspark bench-load`: verification policies under closed-loop load, in process.

At each concurrency c, c clients each keep one request in flight and send the next prompt when theirs
finishes, until `requests` have been served. Every arm runs on the same engine (one proposer, one code path;
only the policy object changes; `plain` submits requests with speculation off) over the same prompts, greedy,
so all arms produce the same tokens and differ only in time. Runs are interleaved per concurrency and
repeated; the report keeps the median repeat. Writes JSON and two PNGs: the throughput / per-user speed
frontier, and the mean verification length per request against concurrency.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from dspark.assembly import build_engine, build_verification_policy
from dspark.engine import Engine, EngineConfig
from dspark.prompts import load_prompts, write_json
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationPolicy, build_policy
from dspark.scheduling.policies import FixedLength

log = logging.getLogger(__name__)


LoadArm = Literal["plain", "fixed", "threshold", "scheduler"]  # plain: speculation off, same engine


class LoadBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: str | None = Field(None, description="JSONL prompt file (default: data/dev_prompts.jsonl)")
    skip_prompts: int = Field(
        0, ge=0, description="take the prompts datasets round-robin and skip this many (held out from tuning)"
    )
    concurrency: list[int] = Field([1, 2, 4, 8, 16, 32], description="closed-loop clients, one run each")
    policies: list[LoadArm] = Field(
        ["plain", "fixed", "threshold", "scheduler"], description="arms compared (plain: no speculation)"
    )
    engine: EngineConfig = Field(
        EngineConfig(max_model_len=1536), description="the engine (max_batch_size: the largest concurrency)"
    )
    requests_per_client: int = Field(2, ge=1, description="requests per client per run")
    min_requests: int = Field(8, ge=1, description="at least this many requests per run (low concurrency)")
    max_tokens: int = Field(96, ge=1, description="tokens generated per request")
    repeats: int = Field(2, ge=1, description="interleaved repeats per concurrency (the median is kept)")
    output: str = Field("results/load.json", description="report path (JSON; PNGs go next to it)")


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
                params: SamplingParams, speculate: bool = True) -> dict:  # fmt: skip
    """Serve `num_requests` prompts with `concurrency` clients in flight; return latency and rate metrics."""
    engine.stats = type(engine.stats)()
    traces: dict[str, _Trace] = {}
    next_prompt = 0

    def submit() -> None:
        nonlocal next_prompt
        request_id = engine.add_request(prompts[next_prompt % len(prompts)], params, speculate=speculate)
        traces[request_id] = _Trace(time.perf_counter())
        next_prompt += 1

    began = time.perf_counter()
    full_until = None  # the first finish with nothing left to submit: from then on fewer clients are busy
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
                elif full_until is None:
                    full_until = now
    ended = time.perf_counter()
    return _metrics(list(traces.values()), began, ended, full_until or ended, engine)


def _metrics(traces: list[_Trace], began: float, ended: float, full_until: float, engine: Engine) -> dict:
    """Until `full_until` every client had a request in flight. That window's rate is the steady state a
    server under this load sees; the whole run's rate also counts the drain, where the last few requests run
    at a smaller batch, a share that shrinks as runs get longer."""
    wall, full_window = ended - began, full_until - began
    tokens = sum(t.num_tokens for t in traces)
    in_window = sum(n for t in traces for at, n in t.token_times if at <= full_until)
    per_user = [t.num_tokens / (t.finished - t.submitted) for t in traces]
    ttft = [t.token_times[0][0] - t.submitted for t in traces if t.token_times]
    gaps = [b[0] - a[0] for t in traces for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    stats = engine.stats
    return {
        "requests": len(traces),
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "throughput_tokens_per_s": round(tokens / wall, 2),
        "full_load_seconds": round(full_window, 3),
        "full_load_tokens_per_s": round(in_window / full_window, 2) if full_window > 0 else 0.0,
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
    engine_config = config.engine.model_copy(update={"max_batch_size": max(config.concurrency)})
    engine = build_engine(engine_config)
    if engine.proposer is None:
        raise ValueError("engine.proposer: bench-load compares speculation policies; choose ngram or dspark")
    policies = {name: _policy(engine, name) for name in config.policies}
    records = load_prompts(config.prompts, skip=config.skip_prompts)
    prompts = [engine.encode_prompt(messages=[{"role": "user", "content": r.turns[0]}]) for r in records]
    params = SamplingParams(max_tokens=config.max_tokens)

    engine.policy = policies.get("fixed") or _policy(engine, "fixed")
    closed_loop(engine, prompts[-4:], 2, 4, params)  # warm-up (and first estimator fits), unreported
    results: dict[str, dict[int, list[dict]]] = {p: {c: [] for c in config.concurrency} for p in policies}
    runs = len(config.concurrency) * config.repeats * len(policies)
    progress = tqdm(total=runs, desc="bench-load runs", unit="run")
    for c in config.concurrency:
        num_requests = max(config.min_requests, c * config.requests_per_client)
        for repeat in range(config.repeats):
            order = list(policies)
            order = order[repeat % len(order) :] + order[: repeat % len(order)]  # rotate: no fixed position
            for name in order:
                # Plain requests never draft; a policy that learns nothing hears their steps, so the
                # scheduler's measured step costs come from its own runs only.
                engine.policy = policies[name] or FixedLength()
                if engine.prefix_cache is not None:  # no arm reuses the prompts an earlier run cached
                    engine.prefix_cache.clear()
                run = closed_loop(engine, prompts, c, num_requests, params, speculate=name != "plain")
                results[name][c].append(run)
                progress.update(1)
                log.info("c=%d %s: %.1f tok/s, per-user %.1f, verify %.2f, tau %.2f", c, name,
                         run["throughput_tokens_per_s"], run["per_user_tokens_per_s"]["median"],
                         run["mean_verification_length"], run["tau"])  # fmt: skip
    progress.close()
    report = _report(config, policies, results)
    write_json(config.output, report)
    plot_load(report, Path(config.output))
    return report


def _policy(engine: Engine, name: LoadArm) -> VerificationPolicy | None:
    """The arm's policy (None for plain: its requests never draft)."""
    if name == "plain":
        return None
    if name == engine.config.verification.policy:
        return engine.policy  # built with the engine: a scheduler holds the measured cost profile
    verification = engine.config.verification.model_copy(update={"policy": name})
    if name == "scheduler":
        return build_verification_policy(
            engine.config.model_copy(update={"verification": verification}), engine.model, engine.proposer
        )
    return build_policy(verification, None)


def _paired_ratios(results: dict[str, dict[int, list[dict]]], c: int) -> dict:
    """Scheduler against the better of plain and fixed, per repeat (the runs of a repeat are adjacent in
    time, so a slow spell hits them alike), then the median over repeats; likewise per-user vs fixed."""

    def rate(name: str, i: int, key: str = "throughput_tokens_per_s") -> float:
        return results[name][c][i][key]

    def per_user(name: str, i: int) -> float:
        return results[name][c][i]["per_user_tokens_per_s"]["median"]

    def vs_best(key: str) -> list[float]:
        best = [max(rate("plain", i, key), rate("fixed", i, key)) for i in repeats]
        return [rate("scheduler", i, key) / b for i, b in zip(repeats, best, strict=True)]

    repeats = range(len(results["scheduler"][c]))
    whole, full = vs_best("throughput_tokens_per_s"), vs_best("full_load_tokens_per_s")
    vs_fixed_user = [per_user("scheduler", i) / per_user("fixed", i) for i in repeats]
    return {
        "scheduler_vs_best_of_plain_and_fixed": round(statistics.median(whole), 3),
        "scheduler_vs_best_at_full_load": round(statistics.median(full), 3),
        "scheduler_per_user_vs_fixed": round(statistics.median(vs_fixed_user), 3),
        "per_repeat_vs_best": [round(x, 3) for x in whole],
        "per_repeat_vs_best_at_full_load": [round(x, 3) for x in full],
    }


def _report(config: LoadBenchConfig, policies: dict, results: dict[str, dict[int, list[dict]]]) -> dict:
    summary = {
        name: {str(c): _median_run(runs) for c, runs in by_c.items()} for name, by_c in results.items()
    }
    comparison = {}
    if {"plain", "fixed", "scheduler"} <= set(summary):
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
