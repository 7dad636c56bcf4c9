"""The `dspark.v1.DSpark` gRPC service over an AsyncEngine (used by the Ray Serve deployment and tests).

Invalid requests end with INVALID_ARGUMENT and a message naming the field; nothing is streamed first.
A cancelled call closes the response stream, which aborts the request and frees its KV slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dspark.errors import InvalidRequestError
from dspark.serving.api import GenerationInput
from dspark.serving.async_engine import AsyncEngine
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc


def generation_input(request: pb.GenerateRequest, default_max_tokens: int) -> GenerationInput:
    """Wire message -> validated input; raises InvalidRequestError naming the field."""
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
    return GenerationInput.parse(
        {
            "prompt": request.prompt if kind == "prompt" else None,
            "messages": [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if kind == "chat"
            else None,
            "sampling": sampling,
            "speculation": request.speculation if request.HasField("speculation") else True,
            "request_id": request.request_id or None,
        }
    )


def response(out, request_id: str) -> pb.GenerateResponse:
    message = pb.GenerateResponse(request_id=request_id, text=out.text, token_ids=out.token_ids)
    if out.finished:
        message.finish_reason = out.finish_reason or ""
        message.usage.prompt_tokens = out.num_prompt_tokens
        message.usage.completion_tokens = out.num_output_tokens
        if out.spec is not None:
            message.speculation.steps = out.spec.steps
            message.speculation.drafted = out.spec.drafted
            message.speculation.accepted = out.spec.accepted
            message.speculation.tau = out.spec.tau
    return message


async def _responses(first, outputs) -> AsyncIterator[pb.GenerateResponse]:
    try:
        yield response(first, first.request_id)
        async for out in outputs:
            yield response(out, out.request_id)
    finally:
        await outputs.aclose()  # a cancelled call closes this stream, which aborts the request


class DSparkService:
    """Implements the service's three RPCs (grpc.aio servicer signatures)."""

    def __init__(self, engine: AsyncEngine, model_id: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        """grpc.aio servicer method: an invalid request aborts with INVALID_ARGUMENT before streaming."""
        try:
            stream = await self.start(request)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        async for message in stream:
            yield message

    async def start(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Validate and submit a request; returns its response stream, first output already produced (so
        every input error surfaces here as InvalidRequestError, naming the field)."""
        if request.model and request.model != self.model_id:
            raise InvalidRequestError("model", f"unknown model {request.model!r} (serving {self.model_id!r})")
        spec = generation_input(request, self.default_max_tokens)
        outputs = self.engine.generate(
            spec.prompt, spec.sampling, messages=spec.chat(), speculate=spec.speculation,
            request_id=spec.request_id,
        )  # fmt: skip
        first = await anext(outputs)
        return _responses(first, outputs)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        config = self.engine.engine.config
        info = pb.ModelInfo(
            id=self.model_id, proposer=config.proposer if config.speculative else "none",
            verification_policy=config.verification.policy, max_model_len=config.max_model_len,
        )  # fmt: skip
        return pb.ListModelsResponse(models=[info])

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        load = self.engine.load()
        status = pb.HealthResponse.NOT_SERVING if self.engine.failed else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, running=load["running"], waiting=load["waiting"])


def add_service(server: grpc.aio.Server, service: DSparkService, reflection: bool = True) -> None:
    """Register the service (and server reflection, so grpcurl and friends can list it) on a server."""
    pb_grpc.add_DSparkServicer_to_server(service, server)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        names = (pb.DESCRIPTOR.services_by_name["DSpark"].full_name, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)
