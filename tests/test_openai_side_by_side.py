"""The side-by-side OpenAI load harness against two fake streaming servers (real HTTP on loopback, so the
openai client runs end to end): token and request counts, timings consistent with the fakes' known delays,
texts in prompt order, the first-over-other ratios and text agreement, usage vs chunk counting, the JSON
round trip, `combine` of separately stored runs, and the PNG."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from load_tests.openai_side_by_side import (
    EndpointReport,
    SideBySideConfig,
    SideBySideReport,
    main,
    wait_until_ready,
)

NUM_PROMPTS = 8
MAX_TOKENS = 4
FAST_S, SLOW_S = 0.03, 0.06  # the fakes' delay before every token: 33 and 17 tokens/s per user
CONCURRENCY = [1, 4]
WARMUP = 1


def fake_app(name: str, delay_s: float, usage: bool, differ_on: str | None = None) -> FastAPI:
    """Streams MAX_TOKENS one-token chunks `delay_s` apart: `<prompt>`, then ` t1`, ` t2`, ... With `usage`
    it honours stream_options.include_usage (a last chunk without choices, as vLLM does); without, it rejects
    stream_options with a 400 (an older server), so the client must count chunks. /v1/models lists a decoy
    first unless `usage`, so that endpoint needs the model name given explicitly."""
    app = FastAPI()
    app.state.calls = 0
    models = [f"fake-{name}"] if usage else ["decoy", f"fake-{name}"]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict:
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in models]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls += 1
        if body["model"] != f"fake-{name}":
            return JSONResponse({"error": {"message": f"unknown model {body['model']}"}}, status_code=404)
        if "stream_options" in body and not usage:
            error = {"message": "stream_options: extra inputs are not permitted", "type": "invalid_request"}
            return JSONResponse({"error": error}, status_code=400)
        assert body["temperature"] == 0 and body["stream"] is True
        prompt, max_tokens = body["messages"][0]["content"], body["max_tokens"]
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        suffix = "!" if differ_on and prompt == differ_on else ""
        events = _events(prompt + suffix, max_tokens, delay_s, with_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    return app


async def _events(prompt: str, max_tokens: int, delay_s: float, with_usage: bool):
    def sse(choices: list, **extra) -> str:
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
        return f"data: {json.dumps(chunk | extra)}\n\n"

    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for i in range(max_tokens):
        await asyncio.sleep(delay_s)
        token = f"<{prompt}>" if i == 0 else f" t{i}"
        yield sse([{"index": 0, "delta": {"content": token}, "finish_reason": None}])
    yield sse([{"index": 0, "delta": {}, "finish_reason": "length"}])
    if with_usage:
        usage = {"prompt_tokens": 3, "completion_tokens": max_tokens, "total_tokens": 3 + max_tokens}
        yield sse([], usage=usage)
    yield "data: [DONE]\n\n"


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app on an ephemeral loopback port in a thread; yields its root URL; stops and joins it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="fake-openai")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the fake server did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the fake server's thread did not stop"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    records = [{"id": f"p{i}", "dataset": "d", "domain": "x", "turns": [f"prompt {i}"]} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[str, FastAPI]]]:
    fast = fake_app("fast", FAST_S, usage=True)
    slow = fake_app("slow", SLOW_S, usage=False, differ_on="prompt 3")
    with serving(fast) as fast_url, serving(slow) as slow_url:
        yield {"fast": (fast_url, fast), "slow": (slow_url, slow)}


@pytest.fixture(scope="module")
def side_by_side(servers, prompts_file, tmp_path_factory) -> tuple[SideBySideReport, Path, float]:
    """One CLI run: fast (the baseline) then slow, at concurrency 1 and 4; (report, out dir, seconds)."""
    out = tmp_path_factory.mktemp("out")
    argv = [
        "--endpoint", f"fast={servers['fast'][0]}", "--endpoint", f"slow={servers['slow'][0]}/v1",
        "--model", "slow=fake-slow", "--concurrency", *map(str, CONCURRENCY), "--max-tokens", str(MAX_TOKENS),
        "--num-prompts", str(NUM_PROMPTS), "--prompts", str(prompts_file), "--warmup", str(WARMUP),
        "--output-run", str(out / "{name}_run.json"), "--output", str(out / "report.json"),
        "--png", str(out / "report.png"),
    ]  # fmt: skip
    start = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - start
    return SideBySideReport.model_validate_json((out / "report.json").read_text()), out, elapsed


def test_counts_tokens_and_requests(side_by_side, servers):
    report, _, _ = side_by_side
    assert list(report.runs) == ["fast", "slow"]
    for name, runs in report.runs.items():
        assert [r.concurrency for r in runs] == CONCURRENCY
        for run in runs:
            assert (run.completed, run.errors) == (NUM_PROMPTS, 0)
            assert run.output_tokens == NUM_PROMPTS * MAX_TOKENS
            assert [r.prompt_index for r in run.requests] == list(range(NUM_PROMPTS))
            assert {(r.completion_tokens, r.finish_reason) for r in run.requests} == {(MAX_TOKENS, "length")}
            assert run.usage_reported is (name == "fast")  # slow rejects stream_options: chunks are counted
        assert runs[0].model == f"fake-{name}"  # fast: from /v1/models; slow: --model (its first is a decoy)
    # every measured prompt once, plus the warmups; slow also saw the one request refusing stream_options
    assert servers["fast"][1].state.calls == len(CONCURRENCY) * (NUM_PROMPTS + WARMUP)
    assert servers["slow"][1].state.calls == len(CONCURRENCY) * (NUM_PROMPTS + WARMUP) + 1


def test_texts_in_prompt_order(side_by_side):
    report, _, _ = side_by_side
    expected = [f"<prompt {i}>" + "".join(f" t{k}" for k in range(1, MAX_TOKENS)) for i in range(NUM_PROMPTS)]
    assert report.prompt_ids == [f"p{i}" for i in range(NUM_PROMPTS)]
    for run in report.runs["fast"]:
        assert run.texts == expected
    slow = report.runs["slow"][0].texts
    assert slow[3] == expected[3].replace("<prompt 3>", "<prompt 3!>")
    assert slow[:3] + slow[4:] == expected[:3] + expected[4:]


@pytest.mark.parametrize("name,delay_s", [("fast", FAST_S), ("slow", SLOW_S)])
def test_speeds_match_the_known_delays(side_by_side, name, delay_s):
    """Per user: MAX_TOKENS tokens in MAX_TOKENS delays, so 1/delay tokens/s less client and HTTP overhead;
    throughput: C such users at once; TTFT: one delay."""
    report, _, _ = side_by_side
    for run in report.runs[name]:
        ideal = 1 / delay_s
        assert 0.5 * ideal < run.per_user_tok_s_median <= 1.05 * ideal, (name, run.concurrency)
        assert 0.5 * ideal * run.concurrency < run.throughput_tok_s <= 1.05 * ideal * run.concurrency
        assert 0.6 < run.throughput_tok_s / (run.concurrency * run.per_user_tok_s_median) <= 1.05
        assert 0.95 * delay_s * 1000 <= run.ttft_ms_p50 <= run.ttft_ms_p90 < delay_s * 1000 + 250
        assert run.e2e_ms_p50 >= 0.95 * MAX_TOKENS * delay_s * 1000


def test_ratios_and_text_agreement(side_by_side):
    report, _, _ = side_by_side
    assert [(c.baseline, c.other, c.concurrency) for c in report.comparisons] == [
        ("fast", "slow", c) for c in CONCURRENCY
    ]
    for comparison, fast, slow in zip(report.comparisons, *report.runs.values(), strict=True):
        expected = fast.per_user_tok_s_median / slow.per_user_tok_s_median
        assert comparison.per_user_median_ratio == pytest.approx(expected)
        assert comparison.throughput_ratio == pytest.approx(fast.throughput_tok_s / slow.throughput_tok_s)
        assert 1.3 < comparison.per_user_median_ratio < 2.6  # the delays differ 2x
        assert 1.3 < comparison.throughput_ratio < 2.6
        assert (comparison.identical_texts, comparison.compared_texts) == (NUM_PROMPTS - 1, NUM_PROMPTS)
        assert comparison.differing_prompts == [3]
    for agreement in report.texts_identical:
        assert agreement.identical_per_prompt == [i != 3 for i in range(NUM_PROMPTS)]
        assert agreement.identical == NUM_PROMPTS - 1


def test_report_files_round_trip_and_combine(side_by_side, tmp_path):
    report, out, elapsed = side_by_side
    assert report.config.endpoints[1].model == "fake-slow"
    assert "api_key" not in json.loads((out / "report.json").read_text())["config"]
    again = SideBySideReport.model_validate_json(report.model_dump_json())
    assert again == report
    runs = [out / "fast_run.json", out / "slow_run.json"]
    stored = [EndpointReport.model_validate_json(p.read_text()) for p in runs]
    assert [s.runs[0].endpoint for s in stored] == ["fast", "slow"]
    combined, png = tmp_path / "combined.json", tmp_path / "c.png"
    assert main(["combine", *map(str, runs), "--output", str(combined), "--png", str(png)]) == 0
    assert SideBySideReport.model_validate_json(combined.read_text()) == report
    for path in (out / "report.png", png):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    print(f"side-by-side CLI run: {elapsed:.1f} s")


def test_combine_refuses_other_prompts(side_by_side, tmp_path):
    _, out, _ = side_by_side
    slow = json.loads((out / "slow_run.json").read_text())
    slow["prompt_ids"] = slow["prompt_ids"][::-1]
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert main(["combine", str(out / "fast_run.json"), str(tmp_path / "slow.json")]) == 2


def test_wait_and_loopback_only(servers):
    assert wait_until_ready(servers["fast"][0], timeout_s=5)
    with serving(FastAPI()) as url:  # no /health, no /v1/models: never ready
        assert not wait_until_ready(url, timeout_s=0)
    far = [{"name": "far", "base_url": "http://10.1.2.3:8000"}]
    with pytest.raises(ValidationError, match="not loopback"):
        SideBySideConfig(endpoints=far)
    config = SideBySideConfig(endpoints=far, allow_remote=True)
    assert config.endpoints[0].base_url == "http://10.1.2.3:8000/v1"
