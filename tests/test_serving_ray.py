"""End to end on a local Ray cluster: the Serve application behind Ray's gRPC and HTTP proxies.

Streamed gRPC text and the `openai` client's text equal the engine's direct greedy output; a cancelled
stream frees its KV slot; bad input gets INVALID_ARGUMENT / 400 naming the field (a max_tokens beyond
max_model_len included) and the next request succeeds; /health answers; server reflection lists the service.
Redeployed with two tensor-parallel ranks, a disaggregated drafter and an API key, the text is the same and
both proxies refuse requests without the key (health stays open).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeConfig
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

MODEL_ID = "SmolLM2-135M-Instruct"
APP = (("application", "dspark"),)
PROMPTS = ["List three colours of the rainbow.", "Write a haiku about autumn leaves."]
MAX_TOKENS = 40
KEY = "ray-s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**overrides) -> ServeConfig:
    base = {
        "model_id": MODEL_ID,
        "engine": {"max_batch_size": 4, "max_model_len": 1024, "verification": {"policy": "scheduler"}},
        "num_cpus": 1,
        "drafter_num_cpus": 0.5,
    }
    return ServeConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def cluster():
    from deployments.launch import start

    ports = {"http_port": _free_port(), "grpc_port": _free_port()}
    ray.init(num_cpus=8, log_to_driver=False)
    try:
        start(_config(), **ports)
        yield ports
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}")
    yield pb_grpc.DSparkStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(default_model, tokenizer) -> list[str]:
    """Greedy text of the engine called directly, plain decoding (no serving layer, no speculation)."""
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=2), model=default_model, tokenizer=tokenizer
    )
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return [c.text for c in plain.generate(PROMPTS, params)]


def _grpc_text(stub, prompt: str, metadata=APP) -> tuple[str, pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS))
    text, last = "", None
    for message in stub.Generate(request, metadata=metadata, timeout=120):
        text, last = text + message.text, message
    return text, last


def test_grpc_stream_equals_direct_greedy(stub, reference):
    for prompt, expected in zip(PROMPTS, reference, strict=True):
        text, last = _grpc_text(stub, prompt)
        assert text == expected
        assert last.finish_reason in ("stop", "length")
        assert last.usage.completion_tokens > 0 and last.speculation.steps > 0


def test_openai_client_gets_the_same_text(cluster, reference):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{cluster['http_port']}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    done = client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == reference[0]
    stream = client.completions.create(
        model=MODEL_ID, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == reference[1]
    with pytest.raises(BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], temperature=7.0)
    with pytest.raises(BadRequestError, match=r"max_tokens.*max_model_len") as caught:
        client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=10**9)
    assert caught.value.response.json()["error"]["param"] == "max_tokens"
    # greedy: a sampled 2-token answer may be EOS at once (empty text), which is no failure
    assert (
        client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=2, temperature=0)
        .choices[0]
        .text
    )


def _http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_health_and_an_unparseable_body(cluster):
    base = f"http://127.0.0.1:{cluster['http_port']}"
    assert _http(base + "/health") == (200, {"status": "ok"})
    status, reply = _http(base + "/v1/completions", b"not json", {"Content-Type": "application/json"})
    assert status == 400 and reply["error"]["message"].startswith("body: not valid JSON")


@pytest.mark.parametrize(
    ("sampling", "field"),
    [({"temperature": -1.0}, "sampling.temperature"), ({"max_tokens": 10**9}, "sampling.max_tokens")],
)
def test_bad_grpc_request_is_invalid_argument_naming_the_field(stub, sampling, field):
    bad = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(**sampling))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(bad, metadata=APP, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert _grpc_text(stub, PROMPTS[0])[0]  # the next request succeeds


def test_cancel_frees_the_slot(stub):
    long = pb.GenerateRequest(
        prompt="Count to ten thousand.", sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True)
    )
    call = stub.Generate(long, metadata=APP, timeout=120)
    received = [next(call) for _ in range(3)]
    assert all(m.token_ids for m in received)
    assert stub.Health(pb.HealthRequest(), metadata=APP).running == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while stub.Health(pb.HealthRequest(), metadata=APP).running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub.Health(pb.HealthRequest(), metadata=APP).running == 0


def test_metrics_reach_the_prometheus_endpoint(stub):
    """The replica's speculation and latency metrics are exported (Ray pushes them every few seconds)."""
    import urllib.request

    _grpc_text(stub, PROMPTS[0])
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {"ray_dspark_output_tokens_total", "ray_dspark_ttft_seconds_bucket", "ray_dspark_queue_length"}
    deadline, found = time.monotonic() + 60, set()
    while time.monotonic() < deadline and not wanted <= found:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_dspark_")}
        time.sleep(2)
    assert wanted <= found


def test_reflection_lists_the_service(cluster):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "dspark.v1.DSpark" in services


def test_serve_cap_leaves_room_for_refusals():
    """Serve's per-replica cap exceeds what the engine admits, so excess requests reach the replica and are
    refused there (429 / RESOURCE_EXHAUSTED) rather than queueing unseen in the proxy."""
    from deployments.dspark_app import REFUSAL_HEADROOM, deployment_options

    config = _config(max_queued_requests=64, max_ongoing_requests=10)
    assert deployment_options(config)["max_ongoing_requests"] == 4 + 64 + REFUSAL_HEADROOM
    assert deployment_options(_config(max_ongoing_requests=500))["max_ongoing_requests"] == 500


@pytest.fixture(scope="module")
def secured(cluster):
    """Redeployed (the last tests of the module): two TP ranks, a disaggregated drafter, an API key."""
    from deployments.dspark_app import build_app

    config = _config(tensor_parallel_size=2, drafter_placement="disaggregated", api_key=KEY)
    serve.run(build_app(config.model_dump()), name="dspark", route_prefix="/")
    return cluster


def test_tensor_parallel_and_disaggregated_drafter_give_the_same_text(secured, stub, reference):
    authorized = (*APP, ("authorization", f"Bearer {KEY}"))
    assert [_grpc_text(stub, p, authorized)[0] for p in PROMPTS] == reference
    from ray.util.state import list_actors

    actors = {a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])}
    assert {"TargetWorker", "DraftWorker"} <= actors


def test_api_key_on_both_proxies(secured, stub):
    for metadata in (APP, (*APP, ("authorization", "Bearer wrong"))):
        with pytest.raises(grpc.RpcError) as caught:
            _grpc_text(stub, PROMPTS[0], metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        stub.ListModels(pb.ListModelsRequest(), metadata=(*APP, ("x-api-key", KEY))).models[0].id == MODEL_ID
    )
    assert stub.Health(pb.HealthRequest(), metadata=APP).status == pb.HealthResponse.SERVING  # no key
    base = f"http://127.0.0.1:{secured['http_port']}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, reply = _http(base + "/v1/models", headers=headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert _http(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert _http(base + "/health")[0] == 200
