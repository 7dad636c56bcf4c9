"""Soak under faults: closed-loop gRPC streams for minutes while the drafter and engine replica are killed.

    python -m load_tests.soak --minutes 10 --concurrency 16 --kill-drafter-every 45 --kill-replica-every 120 \
        --out benchmarks/results/serving/soak.json

Starts a local Ray cluster with the DSpark application (disaggregated drafter, so there is a draft actor to
kill), computes every prompt's greedy reference in process first, then runs `concurrency` clients that each
stream one request after another. Every few seconds the killers SIGKILL the draft worker's or the engine
replica's process (a crash, not a clean stop). Client-side accounting covers every token of every stream:

- refused: the request got an error before its first token (with the gRPC status);
- lost: a stream that broke after tokens had reached the client (must be 0);
- duplicated / missing tokens: a completed stream against its greedy reference (must be 0);
- greedy_equal: completed streams token-identical to the reference;
- latency percentiles, and the resident memory of the long-lived processes (ingress, proxy, controller)
  at the start and the end.

Only loopback addresses are used; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
from pydantic import BaseModel, Field

from dspark.prompts import load_prompts
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeConfig
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

log = logging.getLogger("soak")
APP = (("application", "dspark"),)
# Process titles are `ray::<actor class>[.<method>]`; the ingress's class is a prefix of the engine's.
ENGINE_REPLICA = "ServeReplica:dspark:DSparkEngine"
DRAFT_WORKER = "DraftWorker"
LONG_LIVED = {"ingress": "ServeReplica:dspark:DSpark", "proxy": "ProxyActor", "controller": "ServeController"}


class SoakConfig(BaseModel):
    minutes: float = Field(10.0, gt=0)
    concurrency: int = Field(16, ge=1)
    kill_drafter_every: float = Field(0.0, ge=0, description="seconds between draft-worker kills (0: never)")
    kill_replica_every: float = Field(
        0.0, ge=0, description="seconds between engine-replica kills (0: never)"
    )
    max_tokens: int = Field(48, ge=1)
    prompt_limit: int = Field(32, ge=1)
    request_timeout_s: float = Field(180.0, gt=0)
    grpc_port: int = 9000
    http_port: int = 8000
    out: str = "benchmarks/results/serving/soak.json"


class StreamResult(BaseModel):
    prompt: int
    status: str  # OK, or the gRPC status that ended the call
    tokens: list[int] = []
    e2e_s: float = 0.0
    ttft_s: float | None = None


def _processes(marker: str) -> list[psutil.Process]:
    """Processes whose title names the actor class `marker` exactly (a method may follow after a dot)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        title = (proc.info["cmdline"] or [""])[0]
        if title == f"ray::{marker}" or title.startswith(f"ray::{marker}."):
            found.append(proc)
    return found


def _rss_mb(marker: str) -> float:
    return round(sum(p.memory_info().rss for p in _processes(marker)) / 2**20, 1)


async def _killer(marker: str, every: float, deadline: float, kills: Counter) -> None:
    """SIGKILL the processes whose title carries `marker`, every `every` seconds until the deadline."""
    while every and time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        for proc in _processes(marker):
            log.info("killing %s (pid %d)", marker, proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            kills[marker] += 1


def _reference(prompts: list[str], max_tokens: int, config: ServeConfig) -> list[list[int]]:
    """Greedy outputs of the same model and chat template, in process, without speculation."""
    from dspark.assembly import build_engine

    engine = build_engine(config.engine.model_copy(update={"proposer": "none", "max_batch_size": 8}))
    params = SamplingParams(max_tokens=max_tokens)
    ids = [engine.add_request(messages=[{"role": "user", "content": p}], params=params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    for out in engine.run_until_done():
        tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


async def _client(
    stub, prompts: list[str], config: SoakConfig, deadline: float, start: int, out: list
) -> None:
    index = start
    while time.monotonic() < deadline:
        prompt = index % len(prompts)
        index += 1
        request = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompts[prompt])]),
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=config.max_tokens),
        )
        began = time.perf_counter()
        result = StreamResult(prompt=prompt, status="OK")
        try:
            async for message in stub.Generate(request, metadata=APP, timeout=config.request_timeout_s):
                if message.token_ids and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - began
                result.tokens += list(message.token_ids)
        except grpc.aio.AioRpcError as err:
            result.status = err.code().name
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                await asyncio.sleep(1.0)  # refused: back off as a client should
        result.e2e_s = time.perf_counter() - began
        out.append(result)


def _account(results: list[StreamResult], reference: list[list[int]]) -> dict:
    completed = [r for r in results if r.status == "OK"]
    missing = duplicated = equal = 0
    for r in completed:
        ref = reference[r.prompt]
        equal += r.tokens == ref
        common = next((i for i, (a, b) in enumerate(zip(r.tokens, ref, strict=False)) if a != b), None)
        if common is None:
            common = min(len(r.tokens), len(ref))
        missing += max(len(ref) - common, 0) if len(r.tokens) <= len(ref) else 0
        duplicated += max(len(r.tokens) - common, 0) if len(r.tokens) > len(ref) else 0
    broken = [r for r in results if r.status != "OK" and r.tokens]
    refused = Counter(r.status for r in results if r.status != "OK" and not r.tokens)
    e2e = [r.e2e_s for r in completed]
    ttft = [r.ttft_s for r in completed if r.ttft_s is not None]

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 3) if values else None

    return {
        "requests_sent": len(results),
        "completed": len(completed),
        "refused": dict(refused),
        "lost": len(broken),
        "lost_statuses": dict(Counter(r.status for r in broken)),
        "missing_tokens": missing,
        "duplicated_tokens": duplicated,
        "greedy_equal": equal,
        "greedy_differs": len(completed) - equal,
        "output_tokens": sum(len(r.tokens) for r in completed),
        "e2e_s": {"p50": pct(e2e, 50), "p99": pct(e2e, 99), "max": round(max(e2e), 3) if e2e else None},
        "ttft_s": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "mean_e2e_s": round(statistics.mean(e2e), 3) if e2e else None,
    }


async def _soak(config: SoakConfig, prompts: list[str], reference: list[list[int]]) -> dict:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{config.grpc_port}")
    stub = pb_grpc.DSparkStub(channel)
    # one warm-up request: the replica is up and the reference matches before anything is killed
    warm: list[StreamResult] = []
    await _client(stub, prompts[:1], config, time.monotonic() + 0.001, 0, warm)
    memory_start = {name: _rss_mb(marker) for name, marker in LONG_LIVED.items()}
    deadline = time.monotonic() + config.minutes * 60
    results: list[StreamResult] = []
    kills: Counter = Counter()
    began = time.monotonic()
    await asyncio.gather(
        *(_client(stub, prompts, config, deadline, i * 7, results) for i in range(config.concurrency)),
        _killer(DRAFT_WORKER, config.kill_drafter_every, deadline, kills),
        _killer(ENGINE_REPLICA, config.kill_replica_every, deadline, kills),
    )
    wall = time.monotonic() - began
    await channel.close()
    memory_end = {name: _rss_mb(marker) for name, marker in LONG_LIVED.items()}
    report = _account(results, reference)
    report |= {
        "warmup_equal": bool(warm) and warm[0].tokens == reference[0],
        "wall_s": round(wall, 1),
        "kills": {"drafter": kills[DRAFT_WORKER], "replica": kills[ENGINE_REPLICA]},
        "throughput_tok_s": round(report["output_tokens"] / wall, 2),
        "rss_mb_start": memory_start,
        "rss_mb_end": memory_end,
        "rss_mb_growth": {k: round(memory_end[k] - memory_start[k], 1) for k in memory_start},
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, field in SoakConfig.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=field.description)  # fmt: skip
    config = SoakConfig.model_validate(vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    from ray import serve

    from deployments.launch import start

    serve_config = ServeConfig.model_validate(
        {"engine": {"max_batch_size": config.concurrency, "proposer": "ngram"},
         "drafter_placement": "disaggregated", "num_cpus": 1, "drafter_num_cpus": 0.5}
    )  # fmt: skip
    prompts = [r.turns[0] for r in load_prompts(limit=config.prompt_limit)]
    log.info("greedy references of %d prompts, in process", len(prompts))
    reference = _reference(prompts, config.max_tokens, serve_config)
    ray.init(num_cpus=8, log_to_driver=False)
    try:
        start(serve_config, http_port=config.http_port, grpc_port=config.grpc_port)
        log.info("soaking %.1f min at concurrency %d", config.minutes, config.concurrency)
        report = asyncio.run(_soak(config, prompts, reference))
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"config": config.model_dump(), "serve_config": serve_config.model_dump(), **report}
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "serve_config")}, indent=1))
    ok = report["lost"] == 0 and report["duplicated_tokens"] == 0 and report["missing_tokens"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
