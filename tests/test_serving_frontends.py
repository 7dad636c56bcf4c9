"""The gRPC service and the OpenAI-compatible HTTP app over the async engine, in process (no Ray):
streamed text equals the engine's direct greedy output, bad input gets INVALID_ARGUMENT / 400 naming the
field, and a cancelled stream frees its KV slot."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import uvicorn

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig
from dspark.serving.async_engine import AsyncEngine
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


async def _with_channel(engine, body):
    server = grpc.aio.server()
    add_service(server, DSparkService(engine, MODEL_ID))
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


BAD_ROLE = pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])
BAD_REQUESTS = [
    (_chat_request(temperature=-1.0), "sampling.temperature"),
    (_chat_request(top_p=1.5), "sampling.top_p"),
    (pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), "prompt or messages"),
    (pb.GenerateRequest(prompt="hi", model="gpt-5"), "model"),
    (pb.GenerateRequest(chat=BAD_ROLE), "messages.0.role"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REQUESTS)
def test_grpc_bad_request_is_invalid_argument(engine, request_, field):
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request_):
                pass
        return err.value

    error = _run(_with_channel(engine, body))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


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
