"""OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions (SSE streaming or not), /v1/models, and
GET /health (200 while the engine loop runs, 503 otherwise; open to probes).

Requests are pydantic models of the OpenAI schema (the fields this server honours, plus DSpark extensions
`top_k`, `ignore_eos` and `speculation`). Every refusal answers in OpenAI's error format: 400 naming the bad
field (`param`; a body that is not UTF-8 JSON names `body` in the message), 401 without the API key (when one
is configured, on /v1/*), 404 for an unknown model, 429 with `Retry-After` when the server is at capacity.
A client that disconnects aborts its request: streaming or not, its KV slot is freed at the next step.
`create_app` builds the app for both the in-process server and the Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from dspark.engine import RequestOutput
from dspark.errors import InvalidRequestError, OverloadedError, UnavailableError
from dspark.sampling import SamplingParams
from dspark.serving.api import ChatMessage
from dspark.serving.auth import ApiKeyCheck
from dspark.serving.backend import GenerationBackend


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Literal[False, None] = None
    top_k: int = Field(0, ge=0)  # extensions
    ignore_eos: bool = False
    speculation: bool = True

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters; raises InvalidRequestError naming the request's field."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                max_tokens=self.max_tokens or default_max_tokens, stop=stop, ignore_eos=self.ignore_eos,
            )  # fmt: skip
        except ValidationError as err:
            raise InvalidRequestError.from_validation(err) from err


class CompletionRequest(_OpenAIRequest):
    prompt: str = Field(min_length=1)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(
    status: int,
    message: str,
    param: str | None = None,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _usage(final: RequestOutput) -> dict:
    return {
        "prompt_tokens": final.num_prompt_tokens,
        "completion_tokens": final.num_output_tokens,
        "total_tokens": final.num_prompt_tokens + final.num_output_tokens,
    }


def _finish_reason(out: RequestOutput) -> str | None:
    return None if not out.finished else ("length" if out.finish_reason == "length" else "stop")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a malformed body becomes OpenAI's 400, naming the first bad field."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":  # loc is (body, character offset): not a field
        where = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return _error(400, f"body: not valid JSON ({reason} at character {where})")
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None  # None: the whole body
    return _error(400, f"{field or 'body'}: {first.get('msg', 'invalid request')}", field)


async def http_error(_: Request, err: HTTPException) -> JSONResponse:
    """Starlette's errors (an unparseable body, an unknown route or method) in OpenAI's error format."""
    if isinstance(err.__cause__, UnicodeDecodeError):  # FastAPI: "There was an error parsing the body"
        message = f"body: not valid UTF-8 ({err.__cause__.reason} at byte {err.__cause__.start})"
    elif err.status_code == 400 and err.detail == "There was an error parsing the body":
        message = "body: could not be parsed as JSON"
    else:
        message = str(err.detail)
    return _error(err.status_code, message, headers=err.headers)


async def unavailable(_: Request, err: UnavailableError) -> JSONResponse:
    return _error(503, str(err), kind="server_error")


class RequireApiKey:
    """ASGI middleware: /v1/* answers 401 (OpenAI's error format) unless the request carries the API key.
    It runs before the body is read, so an unauthenticated client learns nothing about its request."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.check = ApiKeyCheck(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.check.enabled:
            path, root = scope["path"], scope.get("root_path", "")
            route = path[len(root) :] if root and path.startswith(root) else path
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            if (route == "/v1" or route.startswith("/v1/")) and not self.check.allows(headers):
                message = "missing or invalid API key: send `Authorization: Bearer <key>`"
                response = _error(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIHandlers:
    """The endpoints' logic over one engine (`create_app` routes to it)."""

    def __init__(self, engine: GenerationBackend, model_id: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens

    def models(self) -> dict:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "dspark"}
        return {"object": "list", "data": [card]}

    def health(self) -> JSONResponse:
        alive = self.engine.alive
        return JSONResponse(
            {"status": "ok" if alive else "engine loop stopped"}, status_code=200 if alive else 503
        )

    async def completions(self, body: CompletionRequest, request: Request):
        started = await self._start(body, prompt=body.prompt)
        if isinstance(started, JSONResponse):
            return started
        stream, first = started
        rid, created, model_id = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_id

        def chunk(out: RequestOutput) -> dict:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": _finish_reason(out)}
            payload = {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                       "choices": [choice]}  # fmt: skip
            if out.finished:
                payload["usage"] = _usage(out)
            return payload

        if body.stream:
            return StreamingResponse(_events(first, stream, chunk), media_type="text/event-stream")
        collected = await _collect(first, stream, request)
        if collected is None:
            return _disconnected()
        final, text = collected
        payload = chunk(final)
        payload["choices"][0]["text"] = text
        return payload

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        started = await self._start(body, messages=[m.model_dump() for m in body.messages])
        if isinstance(started, JSONResponse):
            return started
        stream, first = started
        rid, created, model_id = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_id
        if body.stream:

            def chunk(out: RequestOutput) -> dict:
                delta = {"content": out.text} if out.text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": _finish_reason(out)}
                payload = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model_id, "choices": [choice]}  # fmt: skip
                if out.finished:
                    payload["usage"] = _usage(out)
                return payload

            opening = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}  # fmt: skip
            return StreamingResponse(_events(first, stream, chunk, opening), media_type="text/event-stream")
        collected = await _collect(first, stream, request)
        if collected is None:
            return _disconnected()
        final, text = collected
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": _finish_reason(final)}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [choice], "usage": _usage(final)}  # fmt: skip

    async def _start(self, body: _OpenAIRequest, **inputs):
        """Validate and submit; the first output is awaited so a refusal answers with its status, not a
        broken stream."""
        if body.model and body.model != self.model_id:
            message = f"model: unknown model {body.model!r} (serving {self.model_id!r})"
            return _error(404, message, "model", code="model_not_found")
        try:
            params = body.sampling(self.default_max_tokens)
            stream = self.engine.generate(
                params=params, speculate=body.speculation, strict_max_tokens=body.max_tokens is not None,
                **inputs,
            )  # fmt: skip
            first = await anext(stream)
        except InvalidRequestError as err:
            field = err.field
            if field == "max_tokens" and getattr(body, "max_completion_tokens", None):
                field = "max_completion_tokens"  # name the field the client sent
            return _error(400, f"{field}: {err.message}", field)
        except OverloadedError as err:
            retry = {"Retry-After": str(err.retry_after_s)}
            return _error(429, str(err), kind="overloaded_error", code="server_overloaded", headers=retry)
        except UnavailableError as err:
            return _error(503, str(err), kind="server_error")
        return stream, first


def create_app(
    engine: GenerationBackend, model_id: str, default_max_tokens: int = 256, api_key: str | None = None
) -> FastAPI:
    """The OpenAI-compatible app over one engine: in process (tests, `uvicorn`) and in each Ray Serve
    replica. With `api_key`, /v1/* requires `Authorization: Bearer <api_key>`; /health stays open."""
    handlers = OpenAIHandlers(engine, model_id, default_max_tokens)
    app = FastAPI(title="DSpark", version="1")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(UnavailableError, unavailable)  # a non-streamed request nothing could finish
    app.add_middleware(RequireApiKey, api_key=api_key)
    app.get("/health")(handlers.health)
    app.get("/v1/models")(handlers.models)
    app.post("/v1/completions")(handlers.completions)
    app.post("/v1/chat/completions")(handlers.chat_completions)
    return app


def _disconnected() -> JSONResponse:
    return _error(499, "client disconnected; the request was aborted")  # nobody reads it


async def _collect(
    first: RequestOutput, stream: AsyncIterator[RequestOutput], request: Request
) -> tuple[RequestOutput, str] | None:
    """The whole text of a non-streamed request; None if the client disconnected first, which aborts the
    request (its stream is cancelled) instead of generating for nobody."""

    async def gather() -> tuple[RequestOutput, str]:
        final, text = first, first.text
        async for out in stream:
            final, text = out, text + out.text
        return final, text

    collecting = asyncio.ensure_future(gather())
    watching = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (Ray Serve cancels it when the client goes)
        watching.cancel()
        if not collecting.done():
            collecting.cancel()  # the engine stream's cleanup aborts the request
            await asyncio.wait((collecting,))
    return collecting.result() if not collecting.cancelled() else None


async def _until_disconnect(request: Request) -> None:
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive channel that cannot be watched: never report a disconnect
        await asyncio.get_running_loop().create_future()


async def _events(first, stream, chunk, opening: dict | None = None) -> AsyncIterator[str]:
    """SSE: every verified delta as it comes, then [DONE]. A client that disconnects closes this generator,
    which closes the engine stream and aborts the request. If nothing can continue the request after it
    started (no replica took it over in time), an error event in OpenAI's shape ends the stream."""
    try:
        if opening is not None:
            yield _sse(opening)
        yield _sse(chunk(first))
        async for out in stream:
            yield _sse(chunk(out))
    except UnavailableError as err:
        yield _sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": 503}})
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"
