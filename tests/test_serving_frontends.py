"""The gRPC service and the OpenAI-compatible HTTP app over the async engine, in process (no Ray):
streamed text equals the engine's direct greedy output; bad input, field by field, gets INVALID_ARGUMENT /
400 naming the field and the next request still succeeds; a full server refuses at once (RESOURCE_EXHAUSTED
/ 429 with Retry-After); a cancelled stream, an expired deadline and a disconnected HTTP client free their
KV slot; API keys guard /v1/* and Generate / ListModels while health stays open."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import uvicorn
from fastapi.testclient import TestClient

from dspark.assembly import build_engine
from dspark.engine import EngineConfig, RequestOutput
from dspark.errors import UnavailableError
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.backend import BackendInfo
from dspark.serving.grpc_service import DSparkService, add_service
from dspark.serving.openai_api import create_app
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

MODEL_ID = "SmolLM2-135M-Instruct"
PROMPT = "List three colours of the rainbow."


@pytest.fixture(scope="module")
def engine(default_model, tokenizer):
    config = EngineConfig(
        proposer="ngram",
        num_speculative_tokens=4,
        max_batch_size=4,
        verification=VerificationConfig(policy="fixed"),
    )
    async_engine = AsyncEngine(build_engine(config, model=default_model, tokenizer=tokenizer))
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def reference(default_model, tokenizer) -> str:
    """The engine's own greedy output, called directly (no serving layer)."""
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=1), model=default_model, tokenizer=tokenizer
    )
    outs = plain.stream(messages=[{"role": "user", "content": PROMPT}], params=SamplingParams(max_tokens=40))
    return "".join(o.text for o in outs)


# ---- gRPC -------------------------------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(coro)


async def _with_channel(engine, body, api_key: str | None = None):
    server = grpc.aio.server()
    add_service(server, DSparkService(engine, MODEL_ID, api_key=api_key))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(pb_grpc.DSparkStub(channel))
    finally:
        await server.stop(None)


def _chat_request(**sampling) -> pb.GenerateRequest:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPT)])
    return pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=40, **sampling))


def test_grpc_stream_equals_direct_greedy_output(engine, reference):
    async def body(stub):
        return [m async for m in stub.Generate(_chat_request())]

    messages = _run(_with_channel(engine, body))
    assert "".join(m.text for m in messages) == reference
    final = messages[-1]
    assert final.finish_reason in ("stop", "length")
    assert final.usage.completion_tokens == sum(len(m.token_ids) for m in messages)
    assert final.speculation.steps > 0 and final.speculation.tau >= 1.0
    assert all(not m.finish_reason for m in messages[:-1])


def test_grpc_list_models_and_health(engine):
    async def body(stub):
        return await stub.ListModels(pb.ListModelsRequest()), await stub.Health(pb.HealthRequest())

    models, health = _run(_with_channel(engine, body))
    assert [m.id for m in models.models] == [MODEL_ID]
    assert health.status == pb.HealthResponse.SERVING


def test_grpc_cancel_frees_the_slot(engine):
    async def body(stub):
        call = stub.Generate(_chat_request(ignore_eos=True))
        await anext(call.__aiter__())  # generation has started
        call.cancel()
        for _ in range(100):  # freed within a step or two
            if engine.load()["running"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert _run(_with_channel(engine, body))
    assert engine.engine.cache.num_free == engine.engine.config.max_batch_size


# ---- OpenAI HTTP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_url(engine):
    config = uvicorn.Config(create_app(engine, MODEL_ID), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(http_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=http_url, api_key="unused")


def test_openai_chat_equals_direct_greedy_output(client, reference):
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == reference
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=40, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_completions_and_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    reply = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=8,
                                      temperature=0)  # fmt: skip
    streamed = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"


def test_openai_bad_request_is_400_naming_the_field(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                       temperature=5)  # fmt: skip
    assert "temperature" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="", max_tokens=4)
    assert "prompt" in str(err.value)


def test_outputs_queued_behind_a_slow_consumer_are_coalesced():
    from dspark.engine import RequestOutput
    from dspark.serving.async_engine import _coalesced

    queue: asyncio.Queue = asyncio.Queue()
    parts = [RequestOutput(request_id="r", token_ids=[i], text=str(i)) for i in range(1, 4)]
    final = RequestOutput(request_id="r", token_ids=[4], text="4", finished=True, finish_reason="stop")
    for out in [*parts[1:], final]:
        queue.put_nowait(out)
    merged = _coalesced(parts[0], queue)
    assert merged.token_ids == [1, 2, 3, 4] and merged.text == "1234"
    assert merged.finished and merged.finish_reason == "stop" and queue.empty()
    queue.put_nowait(RuntimeError("engine died"))
    assert isinstance(_coalesced(parts[0], queue), RuntimeError)  # a failure is never swallowed


def test_invalid_request_error_survives_pickling():
    """Ray Serve ships a replica's exception to the proxy pickled; the field must survive the trip."""
    import pickle

    from dspark.errors import InvalidRequestError

    err = pickle.loads(pickle.dumps(InvalidRequestError("sampling.temperature", "must be >= 0")))
    assert (err.field, err.message, str(err)) == (
        "sampling.temperature",
        "must be >= 0",
        "sampling.temperature: must be >= 0",
    )


# ---- bad input: one table, every field, both front ends ------------------------------------------------

DROP = object()  # an HTTP body key to leave out
LONG_PROMPT = "word " * 2100  # more tokens than max_model_len (2048)


def _grpc(
    prompt: str | None = "Hi", chat: list[tuple[str, str]] | None = None, **fields
) -> pb.GenerateRequest:
    sampling = {"max_tokens": 2, **fields.pop("sampling", {})}
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **fields)
    if chat is not None:
        request.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in chat]))
    elif prompt is not None:
        request.prompt = prompt
    return request


def _completion(**fields) -> tuple[str, bytes]:
    body = {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2, **fields}
    return "/completions", json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def _chat(**fields) -> tuple[str, bytes]:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    return "/chat/completions", json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


@dataclass
class Bad:
    """One malformed request per front end, and the field its error must name (gRPC: the details start with
    it; HTTP: `param` is it and the message starts with it; `body` means the message does, `param` null)."""

    name: str
    grpc: pb.GenerateRequest | None = None
    grpc_field: str = ""
    http: tuple[str, bytes] | None = None
    http_field: str = ""
    http_status: int = 400
    says: str = ""  # and the message says this


S = "sampling."
BAD_INPUT = [
    Bad("model", _grpc(model="gpt-5"), "model", _completion(model="gpt-5"), "model", 404),
    Bad("prompt empty", _grpc(prompt=""), "prompt", _completion(prompt=""), "prompt"),
    Bad("prompt missing", _grpc(prompt=None), "prompt", _completion(prompt=DROP), "prompt"),
    Bad("prompt not a string", http=_completion(prompt=5), http_field="prompt"),
    Bad("prompt too long", _grpc(prompt=LONG_PROMPT), "prompt", _completion(prompt=LONG_PROMPT), "prompt",
        says="max_model_len"),
    Bad("messages empty", _grpc(chat=[]), "messages", _chat(messages=[]), "messages"),
    Bad("messages role", _grpc(chat=[("robot", "x")]), "messages.0.role",
        _chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    Bad("messages content", http=_chat(messages=[{"role": "user"}]), http_field="messages.0.content"),
    Bad("temperature", _grpc(sampling={"temperature": -1.0}), S + "temperature", _completion(temperature=5),
        "temperature"),
    Bad("temperature infinite", _grpc(sampling={"temperature": float("inf")}), S + "temperature"),
    Bad("top_p", _grpc(sampling={"top_p": 1.5}), S + "top_p", _completion(top_p=0), "top_p"),
    Bad("top_k", _grpc(sampling={"top_k": -1}), S + "top_k", _completion(top_k=-1), "top_k"),
    Bad("seed", http=_completion(seed=2**70), http_field="seed"),
    Bad("max_tokens", _grpc(sampling={"max_tokens": -3}), S + "max_tokens", _completion(max_tokens=0),
        "max_tokens"),
    Bad("max_tokens beyond max_model_len", _grpc(sampling={"max_tokens": 10**9}), S + "max_tokens",
        _completion(max_tokens=10**9), "max_tokens", says="max_model_len"),
    Bad("max_completion_tokens", http=_chat(max_tokens=DROP, max_completion_tokens=10**9),
        http_field="max_completion_tokens", says="max_model_len"),
    Bad("stop: too many", _grpc(sampling={"stop": ["x"] * 17}), S + "stop", _completion(stop=["x"] * 17),
        "stop", says="16"),
    Bad("stop: too long", _grpc(sampling={"stop": ["x" * 257]}), S + "stop.0", _completion(stop="x" * 257),
        "stop.0", says="256"),
    Bad("stop: empty", _grpc(sampling={"stop": [""]}), S + "stop.0", _completion(stop=[""]), "stop.0"),
    Bad("n", http=_completion(n=2), http_field="n"),
    Bad("logprobs", http=_completion(logprobs=True), http_field="logprobs"),
    Bad("stream", http=_completion(stream="often"), http_field="stream"),
    Bad("ignore_eos", http=_completion(ignore_eos="maybe"), http_field="ignore_eos"),
    Bad("speculation", http=_chat(speculation="x"), http_field="speculation"),
    Bad("request_id", _grpc(request_id="x" * 129), "request_id"),
    Bad("body not JSON", http=("/completions", b"max_tokens=2"), http_field="body"),
    Bad("body not UTF-8", http=("/completions", b'{"prompt": "\xff\xfe"}'), http_field="body", says="UTF-8"),
    Bad("body not an object", http=("/completions", b"[1, 2]"), http_field="body"),
]  # fmt: skip
CASES = [pytest.param(b, "grpc", id=f"grpc-{b.name}") for b in BAD_INPUT if b.grpc is not None] + [
    pytest.param(b, "http", id=f"http-{b.name}") for b in BAD_INPUT if b.http is not None
]


def _post(url: str, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST, error statuses included."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


async def _grpc_outcome(stub, request, metadata=()) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in stub.Generate(request, metadata=metadata):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("bad", "protocol"), CASES)
def test_bad_input_names_the_field_and_the_next_request_succeeds(engine, http_url, bad, protocol):
    if protocol == "grpc":

        async def body(stub):
            return await _grpc_outcome(stub, bad.grpc), await _grpc_outcome(stub, _grpc())

        (code, details), (next_code, _) = _run(_with_channel(engine, body))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"{bad.grpc_field}: ") and bad.says in details, details
        assert next_code == grpc.StatusCode.OK
    else:
        path, payload = bad.http
        status, reply, _ = _post(http_url + path, payload)
        error = reply["error"]
        assert status == bad.http_status, reply
        assert error["message"].startswith(f"{bad.http_field}: ") and bad.says in error["message"], reply
        assert error["param"] == (None if bad.http_field == "body" else bad.http_field), reply
        assert set(error) == {"message", "type", "param", "code"}
        next_status, completion, _ = _post(http_url + "/completions", _completion()[1])
        assert next_status == 200 and completion["usage"]["completion_tokens"] > 0


def test_an_unset_max_tokens_is_cut_at_max_model_len_not_refused(engine, http_url):
    """Only a client's own max_tokens is held to max_model_len; the server default stops there."""
    prompt = "word " * 2030  # ~2031 tokens: fewer than the default 256 remain
    status, reply, _ = _post(http_url + "/completions", _completion(prompt=prompt, max_tokens=DROP)[1])
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] == 2048


# ---- overload, deadlines, disconnects ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(default_model, tokenizer):
    """One running slot and one queued: the third request is refused."""
    config = EngineConfig(proposer="none", max_batch_size=1)
    async_engine = AsyncEngine(
        build_engine(config, model=default_model, tokenizer=tokenizer), max_queued_requests=1
    )
    yield async_engine
    async_engine.shutdown()


def test_a_full_server_refuses_at_once_on_both_front_ends(small):
    # Fill the batch and the queue without stepping; long fillers, so that a loop woken by the refused gRPC
    # call cannot finish them (and free the queue) before the HTTP request arrives.
    with small._lock:
        params = SamplingParams(max_tokens=256, ignore_eos=True)
        fillers = [small.engine.add_request("Hi", params) for _ in range(2)]
    http = TestClient(create_app(small, MODEL_ID))
    try:
        started = time.monotonic()
        code, details = _run(_with_channel(small, lambda stub: _grpc_outcome(stub, _grpc())))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests=1" in details and "retry after 1 s" in details
        reply = http.post(
            "/v1/completions", content=_completion()[1], headers={"Content-Type": "application/json"}
        )
        assert time.monotonic() - started < 5  # refused, not queued
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        error = reply.json()["error"]
        assert error["type"] == "overloaded_error" and "retry after" in error["message"]
    finally:
        for rid in fillers:
            small.abort(rid)
    code, _ = _run(_with_channel(small, lambda stub: _grpc_outcome(stub, _grpc())))
    assert code == grpc.StatusCode.OK
    reply = http.post(
        "/v1/completions", content=_completion()[1], headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 200


def _wait_idle(engine: AsyncEngine, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load = engine.load()
        if load["running"] == 0 and load["waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_grpc_deadline_frees_the_slot(engine):
    long = _grpc(prompt="Count to ten thousand.", sampling={"max_tokens": 1500, "ignore_eos": True})

    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(long, timeout=1.0):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.to_thread(_wait_idle, engine)
        return await _grpc_outcome(stub, _grpc())

    assert _run(_with_channel(engine, body))[0] == grpc.StatusCode.OK
    assert engine.load() == {"running": 0, "waiting": 0}
    assert engine.engine.cache.num_free == engine.engine.config.max_batch_size


def test_http_client_disconnect_frees_the_slot(engine, http_url):
    """A non-streamed request (the streamed case closes its SSE generator) is aborted when the client goes."""
    host, port = http_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    body = _completion(prompt="Count to ten thousand.", max_tokens=1500, ignore_eos=True)[1]
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert engine.load()["running"] == 1
    conn.close()
    assert _wait_idle(engine)
    assert engine.engine.cache.num_free == engine.engine.config.max_batch_size


# ---- API keys and health ----------------------------------------------------------------------------------

KEY = "s3cret-key"


def test_http_api_key_guards_v1_and_leaves_health_open(engine):
    client = TestClient(create_app(engine, MODEL_ID, api_key=KEY))
    completion = _completion()[1]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for reply in (client.get("/v1/models", headers=headers),
                      client.post("/v1/completions", content=completion, headers=headers)):  # fmt: skip
            assert reply.status_code == 401, reply.text
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"] == "Bearer"
    good = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert client.get("/v1/models", headers=good).json()["data"][0]["id"] == MODEL_ID
    reply = client.post("/v1/completions", content=completion, headers=good)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    assert client.get("/health").status_code == 200  # no key needed


def test_http_health_reports_a_dead_engine_loop():
    class Dead:
        alive = False

    reply = TestClient(create_app(Dead(), MODEL_ID)).get("/health")
    assert reply.status_code == 503


def test_grpc_api_key_guards_generate_and_list_models_and_leaves_health_open(engine):
    async def body(stub):
        outcomes = {}
        for name, metadata in [("none", ()), ("wrong", (("authorization", "Bearer wrong"),)),
                               ("bearer", (("authorization", f"Bearer {KEY}"),)),
                               ("x-api-key", (("x-api-key", KEY),))]:  # fmt: skip
            generate = await _grpc_outcome(stub, _grpc(), metadata)
            try:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
                listed = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                listed = err.code()
            outcomes[name] = (generate[0], listed)
        return outcomes, await stub.Health(pb.HealthRequest())

    outcomes, health = _run(_with_channel(engine, body, api_key=KEY))
    unauthenticated = (grpc.StatusCode.UNAUTHENTICATED,) * 2
    ok = (grpc.StatusCode.OK,) * 2
    assert outcomes == {"none": unauthenticated, "wrong": unauthenticated, "bearer": ok, "x-api-key": ok}
    assert health.status == pb.HealthResponse.SERVING


def test_api_key_check():
    from dspark.serving.auth import ApiKeyCheck

    check = ApiKeyCheck(KEY)
    assert check.allows({"authorization": f"Bearer {KEY}"}) and check.allows(
        [("Authorization", f"bearer {KEY}")]
    )
    assert check.allows([("x-api-key", KEY)])
    for headers in (
        {},
        {"authorization": KEY},
        {"authorization": f"Bearer {KEY}x"},
        [("x-api-key-bin", b"k")],
    ):
        assert not check.allows(headers)
    assert ApiKeyCheck(None).allows({}) and ApiKeyCheck("").allows({})


def test_serve_config_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    from dspark.cli import build_parser
    from dspark.config_cli import config_from_args
    from dspark.serving.config import ServeConfig

    monkeypatch.delenv("DSPARK_API_KEY", raising=False)
    assert ServeConfig().api_key is None
    monkeypatch.setenv("DSPARK_API_KEY", "from-env")
    assert ServeConfig().api_key == "from-env"
    assert "from-env" not in repr(ServeConfig())
    args = build_parser().parse_args(["serve", "--api-key", "from-flag"])
    assert config_from_args(ServeConfig, args).api_key == "from-flag"
    assert ServeConfig.model_validate(ServeConfig().model_dump()).api_key == "from-env"  # what replicas get


def _self_signed(tmp_path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_grpc_over_tls(engine, reference, tmp_path):
    """The TLS listener serves the same stream to a client that trusts the certificate; a plaintext client
    gets nothing."""
    from dspark.serving.grpc_service import start_tls_server

    cert, key = _self_signed(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body():
        server = await start_tls_server(DSparkService(engine, MODEL_ID), cert, key, port)
        try:
            credentials = grpc.ssl_channel_credentials(Path(cert).read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                text = "".join([m.text async for m in pb_grpc.DSparkStub(channel).Generate(_chat_request())])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await pb_grpc.DSparkStub(channel).Health(pb.HealthRequest(), timeout=5)
                    plaintext = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    plaintext = err.code()
            return text, plaintext
        finally:
            await server.stop(None)

    text, plaintext = _run(body())
    assert text == reference
    assert plaintext == grpc.StatusCode.UNAVAILABLE


class _DiesAfterOneOutput:
    """A backend whose request fails for good after its first output (no replica could take it over)."""

    alive = True

    def generate(self, prompt=None, params=None, **_):
        async def stream():
            yield RequestOutput(request_id="r", token_ids=[1], text="Hi")
            raise UnavailableError("no replica could continue the request")

        return stream()

    def load(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0}

    def info(self) -> BackendInfo:
        return BackendInfo(proposer="ngram", verification_policy="scheduler", max_model_len=64)


def test_a_request_nothing_can_finish_ends_with_unavailable_on_every_api():
    backend = _DiesAfterOneOutput()
    client = TestClient(create_app(backend, MODEL_ID))
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 4}
    whole = client.post("/v1/completions", json=body)
    assert whole.status_code == 503 and "no replica" in whole.json()["error"]["message"]
    events = client.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
    assert '"text": "Hi"' in events[0]
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == 503
    assert events[2] == "data: [DONE]"

    async def body_grpc(stub):
        received = []
        try:
            async for message in stub.Generate(pb.GenerateRequest(prompt="x")):
                received.append(message.text)
        except grpc.aio.AioRpcError as err:
            return received, err.code()
        return received, grpc.StatusCode.OK

    assert _run(_with_channel(backend, body_grpc)) == (["Hi"], grpc.StatusCode.UNAVAILABLE)
