"""Closed-loop gRPC streaming load generator for `dspark.v1.DSpark/Generate`.

`concurrency` workers share one `grpc.aio` channel; each sends a request, reads the whole stream, and sends
the next one, until `num_requests` requests were issued or `duration_s` elapsed (requests in flight at the
deadline finish and count). Per request it records TTFT, per-token inter-token latencies, end-to-end latency,
output tokens, the server's speculation stats and any gRPC error; the report aggregates them.

Only loopback targets are accepted: this tool must not hammer remote machines.

    python -m load_tests.grpc_load --target 127.0.0.1:9000 --concurrency 8 --num-requests 64 \
        --max-tokens 128 --out results/load_grpc.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dspark.prompts import load_prompts
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

MAX_ERROR_MESSAGES = 5


def split_target(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r} is not host:port (IPv6 as [addr]:port)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False  # any other name: no DNS lookup, refused


class LoadConfig(BaseModel):
    target: str = "127.0.0.1:9000"
    concurrency: int = Field(1, ge=1)
    num_requests: int | None = Field(None, ge=1, description="measured requests (warmup excluded)")
    duration_s: float | None = Field(None, gt=0, description="stop issuing new requests after this long")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    speculation: bool = True
    application: str = Field("dspark", description="Ray Serve application metadata; empty: none sent")
    prompts_file: str | None = Field(
        None, description="JSONL prompt records; None: the repository's dev prompts (data/dev_prompts.jsonl)"
    )
    prompt_limit: int | None = Field(None, ge=1)
    warmup_requests: int = Field(0, ge=0)
    seed: int | None = Field(0, description="shuffles the prompt order; request i samples with seed + i")
    request_timeout_s: float | None = Field(None, gt=0, description="per-request gRPC deadline")
    connect_timeout_s: float = Field(10.0, gt=0)

    @field_validator("target")
    @classmethod
    def _loopback_only(cls, target: str) -> str:
        host, _ = split_target(target)
        if not is_loopback(host):
            raise ValueError(
                f"target host {host!r} is not loopback (127.0.0.0/8, ::1, localhost): "
                "this load generator refuses to hammer remote machines"
            )
        return target

    @model_validator(mode="after")
    def _bounded(self) -> LoadConfig:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests or duration_s (or both) to bound the run")
        return self


class RequestResult(BaseModel):
    index: int
    prompt_id: str
    ok: bool
    ttft_s: float | None = None
    # one per token-carrying message after the first: the gap since the previous one / its tokens
    itl_s: list[float] = Field(default_factory=list)
    itl_tokens: list[int] = Field(default_factory=list)  # the tokens of the message each ITL belongs to
    e2e_s: float
    output_tokens: int = 0
    tokens_per_s: float | None = None
    finish_reason: str = ""
    steps: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    tau: float | None = None
    error_code: str | None = None
    error_message: str | None = None


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class Spread(BaseModel):
    median: float | None = None
    p5: float | None = None
    p95: float | None = None


class ErrorSummary(BaseModel):
    count: int = 0
    by_code: dict[str, int] = Field(default_factory=dict)
    first_messages: list[str] = Field(default_factory=list)


class LoadReport(BaseModel):
    config: LoadConfig
    wall_time_s: float
    completed: int
    errors: ErrorSummary
    output_tokens: int = Field(description="tokens of completed requests")
    output_tokens_per_s: float = Field(description="output_tokens / wall_time_s")
    per_user_tokens_per_s: Spread
    ttft_ms: Percentiles
    itl_ms: Percentiles = Field(description="per-token, each message's tokens weighted equally")
    e2e_ms: Percentiles
    mean_tau: float | None = None
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    warmup_errors: int = 0
    requests: list[RequestResult] = Field(default_factory=list)

    def summary(self) -> str:
        def ms(p: Percentiles) -> str:
            return "n/a" if p.p50 is None else f"p50 {p.p50:.1f} / p95 {p.p95:.1f} ms"

        tau = "n/a" if self.mean_tau is None else f"{self.mean_tau:.2f}"
        user = self.per_user_tokens_per_s.median
        return (
            f"{self.completed} ok, {self.errors.count} errors in {self.wall_time_s:.2f} s | "
            f"{self.output_tokens_per_s:.1f} out tok/s, per-user median "
            f"{'n/a' if user is None else f'{user:.1f}'} tok/s | TTFT {ms(self.ttft_ms)} | "
            f"ITL {ms(self.itl_ms)} | e2e {ms(self.e2e_ms)} | tau {tau}"
        )


# ---- running ---------------------------------------------------------------------------------------------


def _prompts(config: LoadConfig) -> list[tuple[str, str]]:
    """(id, first turn) pairs, shuffled with the seed."""
    records = load_prompts(config.prompts_file, limit=config.prompt_limit)
    prompts = [(r.id, r.turns[0]) for r in records if r.turns]
    if not prompts:
        raise ValueError("the prompt file has no prompts")
    if config.seed is not None:
        random.Random(config.seed).shuffle(prompts)
    return prompts


def _request(config: LoadConfig, text: str, index: int, request_id: str) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens)
    if config.seed is not None:
        sampling.seed = config.seed + index
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=sampling,
        speculation=config.speculation,
        request_id=request_id,
    )


async def _one_request(
    stub: pb_grpc.DSparkStub, config: LoadConfig, request: pb.GenerateRequest, index: int, prompt_id: str
) -> RequestResult:
    metadata = (("application", config.application),) if config.application else None
    start = time.perf_counter()
    last_token_at: float | None = None
    ttft = None
    itl: list[float] = []
    itl_tokens: list[int] = []
    tokens = 0
    final: pb.GenerateResponse | None = None
    try:
        call = stub.Generate(request, metadata=metadata, timeout=config.request_timeout_s)
        async for message in call:
            now = time.perf_counter()
            final = message
            n = len(message.token_ids)
            if n == 0:
                continue
            tokens += n
            if last_token_at is None:
                ttft = now - start
            else:
                itl.append((now - last_token_at) / n)
                itl_tokens.append(n)
            last_token_at = now
    except grpc.aio.AioRpcError as err:
        return RequestResult(index=index, prompt_id=prompt_id, ok=False, e2e_s=time.perf_counter() - start,
                             output_tokens=tokens, error_code=err.code().name,
                             error_message=err.details() or "")  # fmt: skip
    except Exception as err:  # a client-side failure must not end the run either
        return RequestResult(index=index, prompt_id=prompt_id, ok=False, e2e_s=time.perf_counter() - start,
                             output_tokens=tokens, error_code=type(err).__name__,
                             error_message=str(err))  # fmt: skip
    e2e = time.perf_counter() - start
    result = RequestResult(index=index, prompt_id=prompt_id, ok=True, ttft_s=ttft, itl_s=itl,
                           itl_tokens=itl_tokens, e2e_s=e2e, output_tokens=tokens,
                           tokens_per_s=tokens / e2e if e2e > 0 else None)  # fmt: skip
    if final is not None:
        result.finish_reason = final.finish_reason
        if final.HasField("speculation"):
            spec = final.speculation
            result.steps, result.drafted, result.accepted = spec.steps, spec.drafted, spec.accepted
            result.tau = spec.tau
    return result


async def _phase(
    stub: pb_grpc.DSparkStub,
    config: LoadConfig,
    prompts: list[tuple[str, str]],
    limit: int | None,
    deadline: float | None,
    tag: str,
) -> list[RequestResult]:
    """`concurrency` closed-loop workers; each claims the next request index until a bound is hit."""
    results: list[RequestResult] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while True:
            if limit is not None and next_index >= limit:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            index = next_index
            next_index += 1
            prompt_id, text = prompts[index % len(prompts)]
            request = _request(config, text, index, f"{tag}-{index}")
            results.append(await _one_request(stub, config, request, index, prompt_id))

    workers = config.concurrency if limit is None else min(config.concurrency, limit)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return sorted(results, key=lambda r: r.index)


def _percentiles(values: list[float], scale: float = 1000.0) -> Percentiles:
    if not values:
        return Percentiles()
    p50, p95, p99 = np.percentile(np.asarray(values) * scale, [50, 95, 99])
    return Percentiles(p50=float(p50), p95=float(p95), p99=float(p99))


def build_report(
    config: LoadConfig, results: list[RequestResult], wall_time_s: float, warmup_errors: int = 0
) -> LoadReport:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    errors = ErrorSummary(
        count=len(failed),
        by_code=dict(Counter(r.error_code or "UNKNOWN" for r in failed)),
        first_messages=[f"{r.error_code}: {r.error_message}" for r in failed[:MAX_ERROR_MESSAGES]],
    )
    output_tokens = sum(r.output_tokens for r in ok)
    per_user = [r.tokens_per_s for r in ok if r.tokens_per_s is not None]
    spread = Spread()
    if per_user:
        median, p5, p95 = np.percentile(per_user, [50, 5, 95])
        spread = Spread(median=float(median), p5=float(p5), p95=float(p95))
    itl = [v for r in ok for v, n in zip(r.itl_s, r.itl_tokens, strict=True) for _ in range(n)]
    taus = [r.tau for r in ok if r.tau is not None and (r.steps or 0) > 0]
    return LoadReport(
        config=config,
        wall_time_s=wall_time_s,
        completed=len(ok),
        errors=errors,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_time_s if wall_time_s > 0 else 0.0,
        per_user_tokens_per_s=spread,
        ttft_ms=_percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=_percentiles(itl),
        e2e_ms=_percentiles([r.e2e_s for r in ok]),
        mean_tau=float(np.mean(taus)) if taus else None,
        finish_reasons=dict(Counter(r.finish_reason for r in ok)),
        warmup_errors=warmup_errors,
        requests=results,
    )


async def run_load(config: LoadConfig, stub=None) -> LoadReport:
    """Warm up, then run the measured closed loop against `config.target` and aggregate the results.

    `stub`: anything with the DSpark stub's `Generate` (an in-process service, to measure what serving
    adds); by default a grpc.aio channel to `config.target`."""
    if stub is not None:
        return await _measure(stub, config)
    async with grpc.aio.insecure_channel(config.target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), config.connect_timeout_s)
        except asyncio.TimeoutError as err:
            raise ConnectionError(
                f"no gRPC server reachable at {config.target} within {config.connect_timeout_s} s"
            ) from err
        return await _measure(pb_grpc.DSparkStub(channel), config)


async def _measure(stub, config: LoadConfig) -> LoadReport:
    prompts = _prompts(config)
    warmup_errors = 0
    if config.warmup_requests:
        warm = await _phase(stub, config, prompts, config.warmup_requests, None, "warmup")
        warmup_errors = sum(not r.ok for r in warm)
    start = time.perf_counter()
    deadline = start + config.duration_s if config.duration_s is not None else None
    results = await _phase(stub, config, prompts, config.num_requests, deadline, "load")
    wall = time.perf_counter() - start
    return build_report(config, results, wall, warmup_errors)


# ---- CLI -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m load_tests.grpc_load", description="Closed-loop gRPC load on DSpark/Generate."
    )
    parser.add_argument("--target", default="127.0.0.1:9000", help="loopback host:port of the gRPC proxy")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-speculation", action="store_true", help="ask the server not to speculate")
    parser.add_argument("--application", default="dspark", help="Ray Serve app name; '' for a plain server")
    parser.add_argument(
        "--prompts",
        default=None,
        help="JSONL prompt file (default: the repository's dev prompts, data/dev_prompts.jsonl)",
    )
    parser.add_argument("--prompt-limit", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests before the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout-s", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--per-request", action="store_true", help="include every request in the JSON")
    args = parser.parse_args(argv)
    try:
        config = LoadConfig(
            target=args.target, concurrency=args.concurrency, num_requests=args.num_requests,
            duration_s=args.duration_s, max_tokens=args.max_tokens, temperature=args.temperature,
            speculation=not args.no_speculation, application=args.application, prompts_file=args.prompts,
            prompt_limit=args.prompt_limit, warmup_requests=args.warmup, seed=args.seed,
            request_timeout_s=args.request_timeout_s,
        )  # fmt: skip
    except ValidationError as err:
        parser.error(str(err))
    try:
        report = asyncio.run(run_load(config))
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        exclude = None if args.per_request else {"requests"}
        Path(args.out).write_text(report.model_dump_json(indent=2, exclude=exclude) + "\n")
    print(report.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
