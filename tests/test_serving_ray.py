"""End to end on a local Ray cluster: the Serve application behind Ray's gRPC and HTTP proxies.

Streamed gRPC text and the `openai` client's text equal the engine's direct greedy output; a cancelled
stream frees its KV slot; bad input gets INVALID_ARGUMENT / 400 naming the field; server reflection lists
the service. Redeployed with two tensor-parallel ranks and a disaggregated drafter, the text is the same.
"""

from __future__ import annotations

import socket
import time

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


def _grpc_text(stub, prompt: str) -> tuple[str, pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS))
    text, last = "", None
    for message in stub.Generate(request, metadata=APP, timeout=120):
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


def test_bad_grpc_request_is_invalid_argument_naming_the_field(stub):
    bad = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1.0))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(bad, metadata=APP, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in caught.value.details()


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


def test_tensor_parallel_and_disaggregated_drafter_give_the_same_text(cluster, stub, reference):
    from deployments.dspark_app import build_app

    config = _config(tensor_parallel_size=2, drafter_placement="disaggregated")
    serve.run(build_app(config.model_dump()), name="dspark", route_prefix="/")
    assert [_grpc_text(stub, p)[0] for p in PROMPTS] == reference
    from ray.util.state import list_actors

    actors = {a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])}
    assert {"TargetWorker", "DraftWorker"} <= actors
