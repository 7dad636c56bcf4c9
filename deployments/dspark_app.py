"""The DSpark Ray Serve application: one deployment serving gRPC (dspark.v1) and OpenAI-compatible HTTP.

    serve run deployments.dspark_app:build_app        # or: dspark serve [--config configs/serve.yaml]

Each replica owns an engine (target, drafter, scheduler) stepping on a background thread; requests from
the HTTP and gRPC proxies join its continuous batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from dspark.engine import Engine
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.config import ServeConfig
from dspark.serving.grpc_service import DSparkService, InvalidRequest
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
        self.engine = AsyncEngine(Engine(cfg.engine))
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
        except InvalidRequest as err:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(err))
            return
        async for message in stream:
            yield message

    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return await self.grpc.ListModels(request, None)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        return await self.grpc.Health(request, None)

    def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine loop restarts the replica."""
        if self.engine.failed:
            raise RuntimeError("engine loop failed")


def build_app(args: dict | None = None) -> serve.Application:
    """Application builder for `serve run` / serveConfigV2 (`args` is a ServeConfig mapping)."""
    cfg = ServeConfig.model_validate(args or {})
    scaling = cfg.autoscaling
    return DSparkServer.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        },
    ).bind(cfg.model_dump())
