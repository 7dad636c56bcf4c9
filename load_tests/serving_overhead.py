"""What serving adds: the same load through Ray Serve's gRPC proxy and against the engine in this process.

    python -m load_tests.serving_overhead --out benchmarks/results/serving/overhead.json

Starts a local Ray cluster with the DSpark application, then for each repeat and concurrency runs the
closed-loop load generator twice, once over gRPC and once against a `DSparkService` over an `AsyncEngine`
in this process (same engine config, same prompts, same client accounting), alternating which goes
first. Reports per-repeat ratios (served / in-process) of per-user tokens/s and throughput, and their
medians. Then redeploys with the drafter in its own actor and measures the disaggregated hop the same way
(disaggregated / colocated, over gRPC), plus the drafter call time both placements' cost profiles hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from dspark.prompts import write_json
from dspark.serving.config import ServeConfig
from load_tests.grpc_load import LoadConfig, LoadReport, run_load

REQUESTS_PER_USER = 3
MIN_REQUESTS = 8  # concurrency 1 would otherwise rest on 3 requests


class InProcessStub:
    """The stub interface over a DSparkService in this process: no network, no Ray."""

    def __init__(self, service) -> None:
        self.service = service

    def Generate(self, request, metadata=None, timeout=None):
        return self._stream(request)

    async def _stream(self, request):
        stream = await self.service.start(request)
        async for message in stream:
            yield message


def _summary(report: LoadReport) -> dict:
    return {
        "completed": report.completed,
        "errors": report.errors.count,
        "per_user_tok_s_median": report.per_user_tokens_per_s.median,
        "throughput_tok_s": report.output_tokens_per_s,
        "ttft_ms_p50": report.ttft_ms.p50,
        "itl_ms_p50": report.itl_ms.p50,
        "e2e_ms_p95": report.e2e_ms.p95,
        "mean_tau": report.mean_tau,
    }


def _ratios(a: list[dict], b: list[dict]) -> dict:
    """Median over repeats of a/b for per-user tokens/s and throughput (paired by repeat)."""
    out = {}
    for key in ("per_user_tok_s_median", "throughput_tok_s"):
        pairs = [x[key] / y[key] for x, y in zip(a, b, strict=True) if x[key] and y[key]]
        out[key] = {"per_repeat": [round(p, 4) for p in pairs], "median": round(statistics.median(pairs), 4)}
    return out


async def _measure(target: str, stub, concurrency: int, max_tokens: int, seed: int) -> dict:
    requests = max(REQUESTS_PER_USER * concurrency, MIN_REQUESTS)
    config = LoadConfig(
        target=target, concurrency=concurrency, num_requests=requests, max_tokens=max_tokens,
        warmup_requests=1, seed=seed,
    )  # fmt: skip
    return _summary(await run_load(config, stub))


def hop_ms(engine_config, model, counts=(1, 8)) -> dict:
    """Median ms of one propose call, colocated vs through a DraftWorker actor (the per-step hop), timed
    the way the scheduler's cost profile times a drafter."""
    import ray

    from deployments.workers import ActorTransport, DraftWorker
    from dspark.assembly import build_proposer, with_draft_length
    from dspark.proposers.remote import RemoteProposer
    from dspark.scheduling.cost_profile import profile_proposer

    worker = DraftWorker.options(num_cpus=1).remote(engine_config.model_dump(), 1)
    remote = RemoteProposer(ActorTransport(worker), ray.get(worker.describe.remote()))
    placements = {"colocated": build_proposer(engine_config, model), "disaggregated": remote}
    out = {}
    for label, proposer in placements.items():
        length = with_draft_length(engine_config, proposer).num_speculative_tokens
        times = profile_proposer(proposer, model, counts, length)
        out |= {f"{label}_ms_{n}_requests": round(ms, 3) for n, ms in zip(counts, times, strict=True)}
    ray.kill(worker)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hop-concurrency", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--out", default="benchmarks/results/serving/overhead.json")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from deployments.dspark_app import build_app
    from deployments.launch import start
    from dspark.assembly import build_engine
    from dspark.serving.async_engine import AsyncEngine
    from dspark.serving.grpc_service import DSparkService

    cfg = ServeConfig.model_validate(
        {"engine": {"max_batch_size": max(args.concurrency), "verification": {"policy": "scheduler"}}}
    )
    ray.init(num_cpus=8, log_to_driver=False)  # logical CPUs: room for the disaggregated drafter too
    start(cfg)
    target = "127.0.0.1:9000"
    engine_config = cfg.engine.model_copy(update={"num_threads": int(cfg.num_cpus)})
    engine = build_engine(engine_config)
    local = AsyncEngine(engine)
    stub = InProcessStub(DSparkService(local, cfg.model_id, cfg.default_max_tokens))
    served: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    in_process: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    for repeat in range(args.repeats):
        for c in args.concurrency:
            order = [("served", None), ("in_process", stub)]
            for mode, which in order if repeat % 2 == 0 else order[::-1]:
                result = asyncio.run(_measure(target, which, c, args.max_tokens, seed=repeat))
                (served if mode == "served" else in_process)[c].append(result)
                print(f"repeat {repeat} c={c} {mode}: {result}", flush=True)
    local.shutdown()

    hop: dict[int, list[dict]] = {c: [] for c in args.hop_concurrency}
    colocated: dict[int, list[dict]] = {c: [] for c in args.hop_concurrency}
    disaggregated = cfg.model_copy(update={"drafter_placement": "disaggregated"})
    for repeat in range(args.repeats):
        placements = (("disaggregated", disaggregated, hop), ("colocated", cfg, colocated))
        for placement, config, results in placements:
            serve.run(build_app(config.model_dump()), name="dspark", route_prefix="/")
            for c in args.hop_concurrency:
                result = asyncio.run(_measure(target, None, c, args.max_tokens, seed=100 + repeat))
                results[c].append(result)
                print(f"repeat {repeat} c={c} {placement}: {result}", flush=True)
    serve.shutdown()
    drafter_call_ms = hop_ms(cfg.engine, engine.model)
    ray.shutdown()

    payload = {
        "config": cfg.model_dump(),
        "max_tokens": args.max_tokens,
        "requests_per_user": REQUESTS_PER_USER,
        "served_over_in_process": {c: _ratios(served[c], in_process[c]) for c in args.concurrency},
        "disaggregated_over_colocated": {c: _ratios(hop[c], colocated[c]) for c in args.hop_concurrency},
        "drafter_call_ms": drafter_call_ms,
        "runs": {
            "served": served, "in_process": in_process,
            "disaggregated": hop, "colocated": colocated,
        },
    }  # fmt: skip
    write_json(args.out, payload)
    print(json.dumps({k: payload[k] for k in list(payload)[3:6]}, indent=1))
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
