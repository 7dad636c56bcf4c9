"""The DSpark Ray Serve application: one deployment serving gRPC (dspark.v1) and OpenAI-compatible HTTP.

    serve run deployments.dspark_app:build_app        # or: dspark serve [--config configs/serve.yaml]

Each replica is tensor-parallel rank 0 and runs the engine (continuous batch, scheduler, verification) on
a background thread; its follower ranks and a disaggregated drafter are actors in the replica's placement
group (deployments/workers.py). Requests from the HTTP and gRPC proxies join the replica's continuous
batch; across replicas they are routed by expected load (deployments/router.py), and the replica count
follows ongoing requests and squeezed verification budgets (deployments/autoscaling.py).
"""

from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from deployments.metrics import RayMetricsSink
from deployments.workers import placement_bundles, start_replica
from dspark.errors import InvalidRequestError
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.config import ServeConfig
from dspark.serving.grpc_service import DSparkService
from dspark.serving.monitor import ServingMonitor
from dspark.serving.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIHandlers,
    invalid_request,
)
from dspark.v1 import dspark_pb2 as pb

http_app = FastAPI(title="DSpark", version="1")
http_app.add_exception_handler(RequestValidationError, invalid_request)


@serve.deployment(name="DSpark")
@serve.ingress(http_app)
class DSparkServer:
    def __init__(self, config: dict) -> None:
        cfg = ServeConfig.model_validate(config)
        self.workers = start_replica(cfg)
        self.monitor = ServingMonitor(RayMetricsSink())
        self.engine = AsyncEngine(self.workers.engine, self.monitor)
        self.grpc = DSparkService(self.engine, cfg.model_id, cfg.default_max_tokens)
        self.openai = OpenAIHandlers(self.engine, cfg.model_id, cfg.default_max_tokens)

    # ---- OpenAI-compatible HTTP ---------------------------------------------------------------------------

    @http_app.get("/v1/models")
    def models(self) -> dict:
        return self.openai.models()

    @http_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self.openai.completions(body)

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        return await self.openai.chat_completions(body)

    # ---- gRPC (the proxy calls methods by RPC name) ------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            stream = await self.grpc.start(request)
        except InvalidRequestError as err:
            # Serve's proxy reports a raised error with the status code set here (not INTERNAL).
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(err))
            raise
        async for message in stream:
            yield message

    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return await self.grpc.ListModels(request, None)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        return await self.grpc.Health(request, None)

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
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "autoscaling_config": autoscaling,
        "request_router_config": {
            "request_router_class": "deployments.router:ExpectedLoadRouter",
            "request_routing_stats_period_s": 1.0,
        },
    }


def build_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run` / serveConfigV2 (`args` is a ServeConfig mapping)."""
    cfg = ServeConfig.model_validate(args or {})
    return DSparkServer.options(**deployment_options(cfg)).bind(cfg.model_dump())
