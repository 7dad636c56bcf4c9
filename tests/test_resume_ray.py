"""Target faults on a local Ray cluster: the engine replica (or one of its tensor-parallel ranks) is killed
mid-stream, and the client's stream goes on from another replica: the same greedy tokens, none missing,
none repeated."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import psutil
import pytest

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeConfig
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

APP = (("application", "dspark"),)
PROMPT = "Write a long story about a lighthouse keeper and a storm."
MAX_TOKENS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(title: str) -> int:
    """SIGKILL every process whose title is `ray::<title>...` (a crash, not a clean stop)."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        if any(part.startswith(f"ray::{title}") for part in proc.info["cmdline"] or []):
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
    return killed


@pytest.fixture(scope="module")
def reference(default_model, tokenizer) -> list[int]:
    engine = build_engine(
        EngineConfig(proposer="none", max_batch_size=1), model=default_model, tokenizer=tokenizer
    )
    return [
        t
        for out in engine.stream(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        for t in out.token_ids
    ]


@pytest.fixture(scope="module")
def cluster():
    """Deploys a config on one local cluster; the proxies keep the ports of the first start."""
    from deployments.launch import start

    ports = {"http_port": _free_port(), "grpc_port": _free_port()}
    ray.init(num_cpus=8, log_to_driver=False)
    try:
        yield lambda config: (start(config, **ports), ports["grpc_port"])[1]
    finally:
        serve.shutdown()
        ray.shutdown()


def _stream_with_kill(cluster, config: ServeConfig, victim: str) -> tuple[list[int], int]:
    grpc_port = cluster(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.DSparkStub(channel)
    request = pb.GenerateRequest(
        prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    tokens: list[int] = []
    killed = 0
    began = time.monotonic()
    for message in stub.Generate(request, metadata=APP, timeout=240):
        tokens += message.token_ids
        if not killed and len(tokens) >= 20:
            killed = _kill(victim)
    channel.close()
    assert time.monotonic() - began < 240
    return tokens, killed


def _config(**overrides) -> ServeConfig:
    base = {
        "engine": {"max_batch_size": 2, "max_model_len": 1024, "proposer": "ngram"},
        "num_cpus": 1,
        "drafter_num_cpus": 0.5,
    }
    return ServeConfig.model_validate({**base, **overrides})


def test_killed_engine_replica_resumes_without_gap_or_repeat(cluster, reference):
    tokens, killed = _stream_with_kill(cluster, _config(), "ServeReplica:dspark:DSparkEngine")
    assert killed == 1
    assert tokens == reference


def test_killed_tensor_parallel_rank_resumes_without_gap_or_repeat(cluster, reference):
    tokens, killed = _stream_with_kill(cluster, _config(tensor_parallel_size=2), "TargetWorker")
    assert killed == 1
    assert tokens == reference
