"""The gRPC load generator against an in-process fake DSpark servicer with known token counts and delays:
counts, token totals and latency floors are exact, concurrency is bounded, the duration bound stops the run,
failed requests are recorded (not raised), and non-loopback targets are refused."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc
from load_tests.grpc_load import LoadConfig, main, run_load

PROMPTS = ["What is two plus two?", "Name a colour.", "BAD prompt, please reject", "Say hello."]


class FakeDSpark(pb_grpc.DSparkServicer):
    """Streams `messages` messages of `tokens_per_message` tokens: the first after `first_delay`, the rest
    `gap` apart, then a final message with finish reason, usage and speculation stats. A prompt containing
    BAD aborts with INVALID_ARGUMENT."""

    def __init__(self, messages: int = 5, tokens_per_message: int = 2, first_delay=0.03, gap=0.01):
        self.messages, self.tokens_per_message = messages, tokens_per_message
        self.first_delay, self.gap = first_delay, gap
        self.in_flight = self.max_in_flight = self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.seeds: list[int] = []

    async def Generate(self, request, context):
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
        self.seeds.append(request.sampling.seed)
        try:
            if "BAD" in request.chat.messages[0].content:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
            await asyncio.sleep(self.first_delay)
            for i in range(self.messages):
                if i:
                    await asyncio.sleep(self.gap)
                yield pb.GenerateResponse(text="ab", token_ids=[7] * self.tokens_per_message)
            total = self.messages * self.tokens_per_message
            yield pb.GenerateResponse(
                finish_reason="length",
                usage=pb.Usage(prompt_tokens=5, completion_tokens=total),
                speculation=pb.SpeculationStats(steps=self.messages, drafted=self.messages * 3,
                                                accepted=total - self.messages, tau=self.tokens_per_message),
            )  # fmt: skip
        finally:
            self.in_flight -= 1


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [{"id": f"p{i}", "dataset": "t", "domain": "t", "turns": [t]} for i, t in enumerate(PROMPTS)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _with_server(fake: FakeDSpark, body):
    """Run `await body(port)` with the fake serving on 127.0.0.1:<port>."""

    async def go():
        server = grpc.aio.server()
        pb_grpc.add_DSparkServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await body(port)
        finally:
            await server.stop(None)

    return asyncio.run(go())


def test_counts_tokens_latencies_and_bounded_concurrency(prompts_file):
    fake = FakeDSpark()
    config_args = dict(concurrency=4, num_requests=16, max_tokens=32, prompts_file=prompts_file,
                       warmup_requests=2, seed=3)  # fmt: skip
    report = _with_server(fake, lambda port: run_load(LoadConfig(target=f"127.0.0.1:{port}", **config_args)))

    # 16 measured requests cycle over the 4 prompts: the BAD one fails 4 times, the warmup is not counted
    assert fake.calls == 18
    assert report.completed == 12
    assert report.errors.count == 4
    assert report.errors.by_code == {"INVALID_ARGUMENT": 4}
    assert report.errors.first_messages[0] == "INVALID_ARGUMENT: bad prompt"
    assert report.output_tokens == 12 * 5 * 2
    assert report.finish_reasons == {"length": 12}
    assert report.mean_tau == pytest.approx(2.0)
    assert report.output_tokens_per_s == pytest.approx(report.output_tokens / report.wall_time_s)

    ok = [r for r in report.requests if r.ok]
    assert all(r.output_tokens == 10 and len(r.itl_s) == 4 and r.itl_tokens == [2] * 4 for r in ok)
    assert all(r.steps == 5 and r.drafted == 15 and r.accepted == 5 for r in ok)
    assert min(r.ttft_s for r in ok) >= fake.first_delay
    assert min(r.e2e_s for r in ok) >= fake.first_delay + 4 * fake.gap
    assert report.ttft_ms.p50 >= fake.first_delay * 1000
    assert report.ttft_ms.p50 <= report.ttft_ms.p95 <= report.ttft_ms.p99
    # a message's gap is shared by its 2 tokens: on average at least gap / 2 per token
    assert sum(sum(r.itl_s) for r in ok) / sum(len(r.itl_s) for r in ok) >= fake.gap / 2 * 0.9
    assert report.per_user_tokens_per_s.p5 <= report.per_user_tokens_per_s.median
    assert report.per_user_tokens_per_s.median <= 10 / (fake.first_delay + 4 * fake.gap)

    assert fake.max_in_flight == 4  # the configured concurrency, never more
    assert all(m.get("application") == "dspark" for m in fake.metadata)
    assert sorted(fake.seeds[2:]) == [3 + i for i in range(16)]  # measured request i samples with seed + i


def test_duration_bound_stops_the_run(prompts_file):
    fake = FakeDSpark(messages=10, first_delay=0.02, gap=0.02)  # ~0.2 s a request
    config = dict(concurrency=2, duration_s=0.5, prompts_file=prompts_file, application="")
    start = time.perf_counter()
    report = _with_server(fake, lambda port: run_load(LoadConfig(target=f"127.0.0.1:{port}", **config)))
    elapsed = time.perf_counter() - start

    assert 0.5 <= report.wall_time_s < 0.5 + 0.25 + 0.5  # the deadline plus at most one request in flight
    assert elapsed < 3.0
    assert report.completed + report.errors.count == fake.calls >= 4
    assert fake.max_in_flight <= 2
    assert all("application" not in m for m in fake.metadata)  # empty application: no metadata


def test_cli_writes_report(prompts_file, tmp_path, capsys):
    out = tmp_path / "report.json"

    async def body(port):
        argv = ["--target", f"127.0.0.1:{port}", "--concurrency", "2", "--num-requests", "4",
                "--prompts", prompts_file, "--out", str(out)]  # fmt: skip
        return await asyncio.to_thread(main, argv)

    assert _with_server(FakeDSpark(first_delay=0.005, gap=0.002), body) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 3 and report["errors"]["count"] == 1
    assert "requests" not in report  # per-request records only with --per-request
    assert "3 ok, 1 errors" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["10.0.0.1:9000", "example.com:9000", "[2001:db8::1]:9000", "0.0.0.0:1"])
def test_non_loopback_target_is_refused(target):
    with pytest.raises(ValueError, match="not loopback"):
        LoadConfig(target=target, num_requests=1)


@pytest.mark.parametrize("target", ["127.0.0.1:9000", "127.3.2.1:9000", "localhost:9000", "[::1]:9000"])
def test_loopback_targets_are_accepted(target):
    assert LoadConfig(target=target, duration_s=1).target == target


def test_config_needs_a_bound():
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        LoadConfig(target="127.0.0.1:9000")
    with pytest.raises(ValueError, match="host:port"):
        LoadConfig(target="127.0.0.1", num_requests=1)
