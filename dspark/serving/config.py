"""Serving configuration: the engine plus replica resources and scaling (pydantic, read from YAML)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dspark.engine import EngineConfig
from dspark.serving.resume import ResumeConfig

API_KEY_ENV = "DSPARK_API_KEY"


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling on ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)
    policy: Literal["ongoing_requests", "budget_aware"] = Field(
        "budget_aware", description="budget_aware also scales out while the scheduler squeezes speculation"
    )


class GrpcTlsConfig(BaseModel):
    """gRPC over TLS, served by the ingress itself: Ray Serve's own gRPC proxy listens in plaintext only."""

    model_config = ConfigDict(extra="forbid")

    certfile: str = Field(description="PEM certificate (chain) of the server")
    keyfile: str = Field(description="PEM private key of the certificate")
    port: int = Field(9443, ge=1, le=65535, description="port of the TLS listener (dspark.v1.DSpark)")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field("SmolLM2-135M-Instruct", description="the model name clients send and see")
    # The hybrid (prompt lookup, else the DSpark drafter, each gated by the scheduler): 1.09x the better of
    # plain and whole drafts at one client, and within 2% of it at 8-32 clients, on held-out prompts (README,
    # "Five to eight rows in one pass"); prompt lookup alone is level under load, ~15% slower at one client.
    engine: EngineConfig = EngineConfig(max_batch_size=16, proposer="hybrid")
    default_max_tokens: int = Field(256, ge=1, description="when a request sets no max_tokens")
    tensor_parallel_size: int = Field(1, ge=1, description="target shards (rank 0: the replica)")
    drafter_placement: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="drafter in the rank-0 process, or in its own actor (an extra hop per step)"
    )
    num_cpus: float = Field(2, gt=0, description="CPUs per target rank (its engine threads)")
    num_gpus: float = Field(0, ge=0, description="GPUs per target rank")
    drafter_num_cpus: float = Field(1, gt=0, description="CPUs of a disaggregated drafter actor")
    drafter_num_gpus: float = Field(0, ge=0)
    stream_interval_s: float = Field(
        0.1, ge=0, description="a request's messages go out at most this often when it streams alone (its "
        "first token and its end at once): one message carries the tokens of several steps, which saves the "
        "hops to the client their per-message work (0: a message per step, like vLLM's default)",
    )  # fmt: skip
    max_stream_interval_s: float = Field(
        0.5, ge=0, description="with N requests streaming from a replica, each one's interval is "
        "stream_interval_s x N, up to this: the replica's message rate stays near 1 / stream_interval_s "
        "until then, so under load the CPU goes to the engine instead of the hops",
    )  # fmt: skip
    max_queued_requests: int = Field(
        64, ge=0, description="requests a replica holds beyond its running batch (engine.max_batch_size); "
        "more are refused at once with HTTP 429 / gRPC RESOURCE_EXHAUSTED",
    )  # fmt: skip
    max_ongoing_requests: int = Field(
        64, ge=1, description="Ray Serve's cap per replica, raised to at least max_batch_size + "
        "max_queued_requests + 8 so that excess requests reach the replica and are refused, not queued",
    )  # fmt: skip
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get(API_KEY_ENV) or None,
        min_length=1,
        repr=False,
        description=f"clients must send it (HTTP `Authorization: Bearer KEY` on /v1/*, gRPC metadata "
        f"`authorization: Bearer KEY` or `x-api-key`); unset: ${API_KEY_ENV}, else none",
    )  # fmt: skip
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    drafter_timeout_s: float = Field(
        1.0, gt=0, description="deadline of one call to a disaggregated drafter; past it, or when the "
        "drafter fails, requests decode without drafts until it answers again",
    )  # fmt: skip
    graceful_shutdown_timeout_s: float = Field(
        20, ge=0, description="a stopping replica (SIGTERM, downscale, redeploy) waits this long for its "
        "in-flight requests",
    )  # fmt: skip
    ingress_num_cpus: float = Field(
        0.25,
        gt=0,
        description="CPUs of the ingress (HTTP + gRPC front end; resumes streams of failed replicas)",
    )
    resume: ResumeConfig = ResumeConfig()
    grpc_tls: GrpcTlsConfig | None = Field(
        None, description="also serve dspark.v1 over TLS on its own port (the Serve gRPC proxy is plaintext)"
    )
