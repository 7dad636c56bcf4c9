"""The `dspark.v1.DSpark` gRPC service over an AsyncEngine (used by the Ray Serve deployment and tests).

Invalid requests end with INVALID_ARGUMENT and a message naming the field; nothing is streamed first.
A cancelled call closes the response stream, which aborts the request and frees its KV slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from pydantic import ValidationError

from dspark.sampling import SamplingParams
from dspark.serving.api import ChatMessage, GenerationInput, describe
from dspark.serving.async_engine import AsyncEngine
from dspark.v1 import dspark_pb2 as pb


def generation_input(request: pb.GenerateRequest, default_max_tokens: int) -> GenerationInput:
    """Wire message -> validated input; raises ValidationError or ValueError naming the field."""
    s = request.sampling
    sampling = {
        "temperature": s.temperature,
        "top_p": s.top_p if s.top_p else 1.0,
        "top_k": s.top_k,
        "max_tokens": s.max_tokens if s.max_tokens else default_max_tokens,
        "stop": list(s.stop),
        "ignore_eos": s.ignore_eos,
    }
    if s.HasField("seed"):
        sampling["seed"] = s.seed
    kind = request.WhichOneof("input")
    return GenerationInput(
        prompt=request.prompt if kind == "prompt" else None,
        messages=[ChatMessage(role=m.role, content=m.content) for m in request.chat.messages]
        if kind == "chat"
        else None,
        sampling=SamplingParams.model_validate(sampling),
        speculation=request.speculation if request.HasField("speculation") else True,
        request_id=request.request_id or None,
    )


def response(out, request_id: str) -> pb.GenerateResponse:
    message = pb.GenerateResponse(request_id=request_id, text=out.text, token_ids=out.token_ids)
    if out.finished:
        message.finish_reason = out.finish_reason or ""
        message.usage.prompt_tokens = out.num_prompt_tokens
        message.usage.completion_tokens = out.num_output_tokens
        spec = out.spec or {}
        message.speculation.steps = int(spec.get("steps", 0))
        message.speculation.drafted = int(spec.get("drafted", 0))
        message.speculation.accepted = int(spec.get("accepted", 0))
        message.speculation.tau = float(spec.get("tau", 0.0))
    return message


class DSparkService:
    """Implements the service's three RPCs (grpc.aio servicer signatures)."""

    def __init__(self, engine: AsyncEngine, model_id: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:  # noqa: N802
        try:
            if request.model and request.model != self.model_id:
                raise ValueError(f"model: unknown model {request.model!r} (serving {self.model_id!r})")
            spec = generation_input(request, self.default_max_tokens)
            stream = self.engine.generate(
                spec.prompt, spec.sampling, messages=spec.chat(), speculate=spec.speculation,
                request_id=spec.request_id,
            )  # fmt: skip
            first = await anext(stream)
        except ValidationError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, describe(err))
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        yield response(first, first.request_id)
        async for out in stream:
            yield response(out, out.request_id)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:  # noqa: N802
        config = self.engine.engine.config
        info = pb.ModelInfo(
            id=self.model_id, proposer=config.proposer if config.speculative else "none",
            verification_policy=config.verification.policy, max_model_len=config.max_model_len,
        )  # fmt: skip
        return pb.ListModelsResponse(models=[info])

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:  # noqa: N802
        load = self.engine.load()
        status = pb.HealthResponse.NOT_SERVING if self.engine.failed else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, running=load["running"], waiting=load["waiting"])
