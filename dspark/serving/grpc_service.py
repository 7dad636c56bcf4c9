"""The `dspark.v1.DSpark` gRPC service over a generation backend (an AsyncEngine, or the Ray Serve ingress's
resuming client of the engine replicas).

A refused request ends before anything is streamed, with the status `status_of` maps its typed error to:
INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED with a retry hint when the server is at capacity,
UNAUTHENTICATED without the API key (Generate and ListModels; Health stays open for probes), UNAVAILABLE
when the engine loop has stopped. A cancelled call or an expired deadline closes the response stream, which
aborts the request and frees its KV slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from dspark.errors import AuthenticationError, InvalidRequestError, OverloadedError, UnavailableError
from dspark.serving.api import GenerationInput
from dspark.serving.auth import ApiKeyCheck, Headers
from dspark.serving.backend import GenerationBackend
from dspark.v1 import dspark_pb2 as pb
from dspark.v1 import dspark_pb2_grpc as pb_grpc

# The typed errors a request can be refused with, and their gRPC status.
STATUS = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}
REFUSALS = tuple(STATUS)


def status_of(err: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in STATUS.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


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


SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)


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
    """Implements the service's three RPCs (grpc.aio servicer signatures). `start`, `models` and `health`
    are the same logic for callers that map errors themselves (the Ray Serve deployment, load tests)."""

    def __init__(
        self,
        engine: GenerationBackend,
        model_id: str,
        default_max_tokens: int = 256,
        api_key: str | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.api_key = ApiKeyCheck(api_key)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        """grpc.aio servicer method: a refused request aborts with its status before streaming."""
        try:
            stream = await self.start(request, context.invocation_metadata() or ())
        except REFUSALS as err:
            await context.abort(status_of(err), str(err))
        try:
            async for message in stream:
                yield message
        except REFUSALS as err:  # mid-stream: nothing could continue the request (UNAVAILABLE)
            await context.abort(status_of(err), str(err))

    async def start(
        self, request: pb.GenerateRequest, metadata: Headers = ()
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Authorize, validate and submit a request; returns its response stream, first output already
        produced, so every refusal surfaces here as one of the typed errors in STATUS."""
        self.api_key.check(metadata)
        if request.model and request.model != self.model_id:
            raise InvalidRequestError("model", f"unknown model {request.model!r} (serving {self.model_id!r})")
        spec = generation_input(request, self.default_max_tokens)
        outputs = self.engine.generate(
            spec.prompt, spec.sampling, messages=spec.chat(), speculate=spec.speculation,
            request_id=spec.request_id, strict_max_tokens=bool(request.sampling.max_tokens),
        )  # fmt: skip
        try:
            first = await anext(outputs)
        except InvalidRequestError as err:
            if err.field in SAMPLING_FIELDS:  # the engine names a sampling field without the wire prefix
                raise InvalidRequestError(f"sampling.{err.field}", err.message) from err
            raise
        return _responses(first, outputs)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        try:
            self.api_key.check(context.invocation_metadata() or ())
        except AuthenticationError as err:
            await context.abort(status_of(err), str(err))
        return self.models()

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return self.health()  # open: liveness probes carry no key

    def models(self) -> pb.ListModelsResponse:
        engine = self.engine.info()
        info = pb.ModelInfo(
            id=self.model_id, proposer=engine.proposer, verification_policy=engine.verification_policy,
            max_model_len=engine.max_model_len,
        )  # fmt: skip
        return pb.ListModelsResponse(models=[info])

    def health(self) -> pb.HealthResponse:
        load = self.engine.load()
        status = pb.HealthResponse.SERVING if self.engine.alive else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=status, running=load["running"], waiting=load["waiting"])


def add_service(server: grpc.aio.Server, service: DSparkService, reflection: bool = True) -> None:
    """Register the service (and server reflection, so grpcurl and friends can list it) on a server."""
    pb_grpc.add_DSparkServicer_to_server(service, server)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        names = (pb.DESCRIPTOR.services_by_name["DSpark"].full_name, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)


async def start_tls_server(service: DSparkService, certfile: str, keyfile: str, port: int) -> grpc.aio.Server:
    """A grpc.aio server for `service` over TLS on `port` (all interfaces), started. gRPC sets SO_REUSEPORT,
    so several ingress replicas on one node share the port."""
    server = grpc.aio.server()
    add_service(server, service)
    credentials = grpc.ssl_server_credentials([(Path(keyfile).read_bytes(), Path(certfile).read_bytes())])
    server.add_secure_port(f"[::]:{port}", credentials)
    await server.start()
    return server
