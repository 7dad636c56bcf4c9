"""OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions (SSE streaming or not), /v1/models.

Requests are pydantic models of the OpenAI schema (the fields this server honours, plus DSpark extensions
`top_k`, `ignore_eos` and `speculation`); a bad field answers 400 in OpenAI's error format, naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dspark.engine import RequestOutput
from dspark.errors import InvalidRequestError
from dspark.sampling import SamplingParams
from dspark.serving.api import ChatMessage
from dspark.serving.async_engine import AsyncEngine


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


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


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
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return _error(400, f"{field or 'request'}: {first.get('msg', 'invalid request')}", field)


class OpenAIHandlers:
    """The endpoints' logic over one engine; `create_app` routes to it, and so does the Ray Serve ingress."""

    def __init__(self, engine: AsyncEngine, model_id: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens

    def models(self) -> dict:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "dspark"}
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest):
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
        final, text = await _collect(first, stream)
        payload = chunk(final)
        payload["choices"][0]["text"] = text
        return payload

    async def chat_completions(self, body: ChatCompletionRequest):
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
        final, text = await _collect(first, stream)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": _finish_reason(final)}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [choice], "usage": _usage(final)}  # fmt: skip

    async def _start(self, body: _OpenAIRequest, **inputs):
        """Validate and submit; the first output is awaited so bad input answers 400, not a broken stream."""
        if body.model and body.model != self.model_id:
            return _error(404, f"model: unknown model {body.model!r} (serving {self.model_id!r})", "model")
        try:
            params = body.sampling(self.default_max_tokens)
            stream = self.engine.generate(params=params, speculate=body.speculation, **inputs)
            first = await anext(stream)
        except InvalidRequestError as err:
            return _error(400, str(err), err.field)
        return stream, first


def create_app(engine: AsyncEngine, model_id: str, default_max_tokens: int = 256) -> FastAPI:
    """A standalone OpenAI-compatible app over one engine (tests, `uvicorn`)."""
    handlers = OpenAIHandlers(engine, model_id, default_max_tokens)
    app = FastAPI(title="DSpark", version="1")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.get("/v1/models")(handlers.models)
    app.post("/v1/completions")(handlers.completions)
    app.post("/v1/chat/completions")(handlers.chat_completions)
    return app


async def _collect(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> tuple[RequestOutput, str]:
    final, text = first, first.text
    async for out in stream:
        final, text = out, text + out.text
    return final, text


async def _events(first, stream, chunk, opening: dict | None = None) -> AsyncIterator[str]:
    """SSE: every verified delta as it comes, then [DONE]. A client that disconnects closes this generator,
    which closes the engine stream and aborts the request."""
    try:
        if opening is not None:
            yield _sse(opening)
        yield _sse(chunk(first))
        async for out in stream:
            yield _sse(chunk(out))
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()
