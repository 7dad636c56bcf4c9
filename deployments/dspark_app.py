"""The DSpark Ray Serve application: an ingress serving gRPC (dspark.v1) and OpenAI-compatible HTTP, in front
of the engine replicas.

    serve run deployments.dspark_app:build_app        # or: dspark serve [--config configs/serve.yaml]

`DSparkEngine` replicas each run the engine (continuous batch, scheduler, verification) on a background
thread, as tensor-parallel rank 0; their follower ranks and a disaggregated drafter are actors in the
replica's placement group (deployments/workers.py). Requests are routed to them by expected load
(deployments/router.py), and their count follows ongoing requests and squeezed verification budgets
(deployments/autoscaling.py).

`DSpark`, the ingress, holds no model: it authorizes and validates requests (the same `create_app` and
`DSparkService` as in process) and streams each one from an engine replica. It keeps what each client
received, so when an engine replica or one of its ranks dies mid-stream the request resumes on another or
the restarted replica by re-prefilling prompt and received tokens (`dspark.serving.resume`): the client's
stream continues with no gap and no repeat, or ends with UNAVAILABLE / 503 when no replica takes it in time.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from deployments.metrics import RayMetricsSink
from deployments.workers import placement_bundles, start_replica
from dspark.engine import RequestOutput
from dspark.errors import UnavailableError
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.backend import BackendInfo
from dspark.serving.config import ServeConfig
from dspark.serving.grpc_service import REFUSALS, DSparkService, start_tls_server, status_of
from dspark.serving.monitor import ServingMonitor
from dspark.serving.openai_api import create_app
from dspark.serving.resume import EngineHealth, GenerateCall, ResumingBackend
from dspark.v1 import dspark_pb2 as pb

log = logging.getLogger(__name__)
# Serve's per-replica cap stays above what the engine admits (running batch + queue), so requests beyond
# capacity reach the replica and are refused at once (429 / RESOURCE_EXHAUSTED) instead of queueing unseen.
REFUSAL_HEADROOM = 8
HEALTH_POLL_S = 2.0
# Errors that mean "this replica can no longer serve the stream" (not "the request is bad"): resumed.
FAULTS = (RayActorError, ActorUnavailableError, UnavailableError)


def is_fault(err: BaseException) -> bool:
    return isinstance(err, FAULTS)


@serve.deployment(name="DSparkEngine")
class DSparkEngine:
    """One engine replica: the engine, its workers and its metrics."""

    def __init__(self, config: dict) -> None:
        cfg = ServeConfig.model_validate(config)
        self.workers = start_replica(cfg)
        self.monitor = ServingMonitor(RayMetricsSink())
        self.engine = AsyncEngine(
            self.workers.engine,
            self.monitor,
            cfg.max_queued_requests,
            cfg.stream_interval_s,
            cfg.max_stream_interval_s,
        )

    async def generate(self, call: GenerateCall) -> AsyncIterator[RequestOutput]:
        stream = self.engine.generate(
            call.prompt, call.params, messages=call.messages, speculate=call.speculate,
            request_id=call.request_id, strict_max_tokens=call.strict_max_tokens, resume=call.resume,
        )  # fmt: skip
        async for out in stream:
            yield out

    def health(self) -> EngineHealth:
        return EngineHealth(alive=self.engine.alive, **self.engine.load())

    def info(self) -> BackendInfo:
        return self.engine.info()

    # ---- Serve hooks --------------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine loop restarts the replica."""
        if self.engine.failed:
            raise RuntimeError("engine loop failed")

    def record_routing_stats(self) -> dict:
        """What the expected-load router ranks replicas by."""
        return self.monitor.load().model_dump()

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.monitor.load()
        return {"budget_squeeze": load.budget_squeeze, "verification_budget": load.verification_budget}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.workers.shutdown()


@serve.deployment(name="DSpark")
@serve.ingress()  # the HTTP app is built in __init__, over the resuming backend: __serve_build_asgi_app__
class DSparkServer:
    async def __init__(self, engine: DeploymentHandle, config: dict) -> None:
        cfg = ServeConfig.model_validate(config)
        self.engines = engine
        info = await engine.info.remote()
        self.backend = ResumingBackend(self._stream, is_fault, info, cfg.resume)
        self.grpc = DSparkService(self.backend, cfg.model_id, cfg.default_max_tokens, cfg.api_key)
        self.http = create_app(self.backend, cfg.model_id, cfg.default_max_tokens, cfg.api_key)
        self._poller = asyncio.get_running_loop().create_task(self._poll_health())
        self._tls = None
        if cfg.grpc_tls is not None:  # same service, same checks; only the transport differs
            tls = cfg.grpc_tls
            self._tls = await start_tls_server(self.grpc, tls.certfile, tls.keyfile, tls.port)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """OpenAI-compatible HTTP: the in-process app, API-key check and error mapping included."""
        return self.http

    async def _stream(self, call: GenerateCall) -> AsyncGenerator[RequestOutput, None]:
        """One attempt at a request on whichever engine replica the router picks."""
        response = self.engines.options(stream=True).generate.remote(call)
        finished = False
        try:
            async for out in response:
                finished = out.finished
                yield out
        finally:
            if not finished:  # the client left (or the replica died): stop the work there, free the slot
                response.cancel()

    async def _refresh_health(self) -> None:
        try:
            self.backend.health = await asyncio.wait_for(self.engines.health.remote(), HEALTH_POLL_S * 2)
        except Exception as err:  # no replica answers: report it
            log.warning("engine health poll failed: %s", err)
            self.backend.health = EngineHealth(alive=False)

    async def _poll_health(self) -> None:
        """Keeps the health HTTP /health reports (a synchronous handler) at most a poll period old."""
        while True:
            await self._refresh_health()
            await asyncio.sleep(HEALTH_POLL_S)

    # ---- gRPC (the proxy calls methods by RPC name) ------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            stream = await self.grpc.start(request, grpc_context.invocation_metadata())
        except REFUSALS as err:
            _refuse(grpc_context, err)
            raise
        try:
            async for message in stream:
                yield message
        except REFUSALS as err:  # mid-stream: no replica could continue the request in time
            _refuse(grpc_context, err)
            raise

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListModelsResponse:
        try:
            self.grpc.api_key.check(grpc_context.invocation_metadata())
        except REFUSALS as err:
            _refuse(grpc_context, err)
            raise
        return self.grpc.models()

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        await self._refresh_health()  # a replica's load as of now, not the last poll
        return self.grpc.health()  # open: liveness probes carry no key


def deployment_options(cfg: ServeConfig) -> dict:
    scaling = cfg.autoscaling
    autoscaling = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
    }
    if scaling.policy == "budget_aware":
        autoscaling["policy"] = {"policy_function": "deployments.autoscaling:budget_aware_policy"}
    return {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "placement_group_bundles": placement_bundles(cfg),
        # Tensor-parallel ranks all-reduce twice per layer: keep them on one node.
        "placement_group_strategy": "STRICT_PACK" if cfg.tensor_parallel_size > 1 else "PACK",
        "max_ongoing_requests": max(
            cfg.max_ongoing_requests, cfg.engine.max_batch_size + cfg.max_queued_requests + REFUSAL_HEADROOM
        ),
        "autoscaling_config": autoscaling,
        **_graceful_shutdown(cfg),
        "request_router_config": {
            "request_router_class": "deployments.router:ExpectedLoadRouter",
            "request_routing_stats_period_s": 1.0,
        },
    }


def _refuse(grpc_context: RayServegRPCContext, err: BaseException) -> None:
    """Serve's proxy reports a raised error with the status set here (not INTERNAL)."""
    grpc_context.set_code(status_of(err))
    grpc_context.set_details(str(err))


def ingress_options(cfg: ServeConfig) -> dict:
    """The ingress holds no model: a fraction of a CPU, and every stream the engine replicas could hold."""
    engine_cap = deployment_options(cfg)["max_ongoing_requests"] * cfg.autoscaling.max_replicas
    return {
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
        "max_ongoing_requests": engine_cap,
        **_graceful_shutdown(cfg),
    }


def _graceful_shutdown(cfg: ServeConfig) -> dict:
    """A stopping replica gets no new requests and waits this long for its streams (SIGTERM, downscale)."""
    return {
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
    }


def build_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run` / serveConfigV2 (`args` is a ServeConfig mapping)."""
    cfg = ServeConfig.model_validate(args or {})
    engine = DSparkEngine.options(**deployment_options(cfg)).bind(cfg.model_dump())
    return DSparkServer.options(**ingress_options(cfg)).bind(engine, cfg.model_dump())
