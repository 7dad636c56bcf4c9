"""Streams that survive the death of the replica serving them.

The front end keeps what its client already received of a request (tokens and text). If the engine behind
the stream fails (its replica or a tensor-parallel rank died, its engine loop stopped), the request starts
again on whichever replica can take it, resumed: the prompt and the received tokens are re-prefilled and
count as output (`ResumeState`), so the client's stream continues with no gap and no repeat. Client
errors pass through at once. If no replica takes the request within `retry_timeout_s` of the last
progress, the client gets `UnavailableError` (HTTP 503, gRPC UNAVAILABLE) instead of a silent hang.

No Ray in here: the caller supplies how to start a stream and which errors are faults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from dspark.engine import RequestOutput, ResumeState
from dspark.errors import UnavailableError
from dspark.sampling import SamplingParams
from dspark.serving.backend import BackendInfo

log = logging.getLogger(__name__)

StartStream = Callable[[ResumeState | None], AsyncGenerator[RequestOutput, None]]


class ResumeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retry_timeout_s: float = Field(
        90.0, gt=0, description="give up (503 / UNAVAILABLE) after this long without progress"
    )
    first_backoff_s: float = Field(0.25, gt=0, description="wait before the first retry; doubles per retry")
    max_backoff_s: float = Field(4.0, gt=0, description="longest wait between retries")


class StreamEnded(RuntimeError):
    """A stream stopped before its final output (its replica shut down): resumed like a fault."""


async def resumable(
    start: StartStream,
    is_fault: Callable[[BaseException], bool],
    config: ResumeConfig | None = None,
) -> AsyncGenerator[RequestOutput, None]:
    """The outputs of one request, across as many (resumed) streams as faults require."""
    config = config or ResumeConfig()
    tokens: list[int] = []
    chars = 0
    request_id: str | None = None
    retries = 0
    last_progress = time.monotonic()
    while True:
        resume = ResumeState(output_ids=tokens, text_chars=chars) if tokens else None
        stream = start(resume)
        try:
            async for out in stream:
                request_id = request_id or out.request_id
                tokens += out.token_ids
                chars += len(out.text)
                last_progress = time.monotonic()
                # The client keeps seeing its first request id, whichever replica continues the request.
                yield (
                    out if out.request_id == request_id else out.model_copy(update={"request_id": request_id})
                )
                if out.finished:
                    return
            raise StreamEnded("the stream ended before its final output")
        except Exception as err:
            if not (isinstance(err, StreamEnded) or is_fault(err)):
                raise
            waited = time.monotonic() - last_progress
            if waited >= config.retry_timeout_s:
                raise UnavailableError(
                    f"no replica could continue the request for {waited:.0f} s (last error: {err})"
                ) from err
            delay = min(config.first_backoff_s * 2**retries, config.max_backoff_s)
            retries += 1
            log.warning(
                "request %s: %s; resuming after %d tokens in %.2f s", request_id, err, len(tokens), delay
            )
            await asyncio.sleep(delay)
        finally:
            await _close(stream)


async def _close(stream: AsyncGenerator[RequestOutput, None]) -> None:
    try:
        await stream.aclose()
    except Exception:  # closing a stream whose replica died can fail again: nothing is left to free
        log.debug("closing a failed stream", exc_info=True)


class GenerateCall(BaseModel):
    """One request as a front end hands it to an engine replica (pickled across processes)."""

    prompt: str | list[int] | None = None
    params: SamplingParams | None = None
    messages: list[dict] | None = None
    speculate: bool = True
    request_id: str | None = None
    strict_max_tokens: bool = False
    resume: ResumeState | None = None


class EngineHealth(BaseModel):
    alive: bool
    running: int = 0
    waiting: int = 0


class ResumingBackend:
    """A generation backend over remote engine replicas: `start` opens a request's stream on some replica,
    and every request resumes after a fault (see `resumable`). Health is what the last poll saw."""

    def __init__(
        self,
        start: Callable[[GenerateCall], AsyncGenerator[RequestOutput, None]],
        is_fault: Callable[[BaseException], bool],
        info: BackendInfo,
        config: ResumeConfig | None = None,
    ) -> None:
        self._start = start
        self._is_fault = is_fault
        self._info = info
        self.config = config or ResumeConfig()
        self.health = EngineHealth(alive=True)

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        speculate: bool = True,
        request_id: str | None = None,
        strict_max_tokens: bool = False,
        resume: ResumeState | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        call = GenerateCall(
            prompt=prompt if prompt is None or isinstance(prompt, str) else list(prompt), params=params,
            messages=messages, speculate=speculate, request_id=request_id,
            strict_max_tokens=strict_max_tokens, resume=resume,
        )  # fmt: skip

        def start(after_fault: ResumeState | None) -> AsyncGenerator[RequestOutput, None]:
            return self._start(
                call if after_fault is None else call.model_copy(update={"resume": after_fault})
            )

        return resumable(start, self._is_fault, self.config)

    @property
    def alive(self) -> bool:
        return self.health.alive

    def load(self) -> dict[str, int]:
        return {"running": self.health.running, "waiting": self.health.waiting}

    def info(self) -> BackendInfo:
        return self._info
