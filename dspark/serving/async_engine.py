"""The engine behind an asyncio front end: one background thread steps the engine, requests stream.

`Engine` is single-threaded; every call into it (add, abort, step) holds one lock. The loop thread steps while
there is work and sleeps on an event otherwise; on a first start it measures the scheduler's cost profile in
that idle time, one timed run at a time, so a request never waits for more than one run. Each request's
outputs go to its own asyncio queue on the caller's event loop. A consumer that stops early (client cancel,
disconnect, deadline) aborts its request, which frees the KV slot before the next step.

Admission control: the engine holds at most `max_batch_size` running requests plus `max_queued_requests`
waiting ones; a request beyond that is refused at once with `OverloadedError` (HTTP 429, gRPC
RESOURCE_EXHAUSTED), so a burst gets a fast answer to retry elsewhere instead of an unbounded wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from dspark.engine import Engine, RequestOutput, ResumeState
from dspark.errors import OverloadedError, UnavailableError
from dspark.sampling import SamplingParams
from dspark.serving.backend import BackendInfo
from dspark.serving.monitor import ServingMonitor

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # the hint a refused client gets: a slot frees as soon as any request finishes


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineStopped(UnavailableError):
    """The engine loop died; in-flight requests get this instead of hanging."""


class AsyncEngine:
    def __init__(
        self, engine: Engine, monitor: ServingMonitor | None = None, max_queued_requests: int = 64
    ) -> None:
        self.engine = engine
        self.monitor = monitor
        self.max_queued_requests = max_queued_requests
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._failure: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self._thread.start()

    # ---- requests -----------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        speculate: bool = True,
        request_id: str | None = None,
        strict_max_tokens: bool = False,
        resume: ResumeState | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Before anything is streamed it raises InvalidRequestError for invalid
        input and OverloadedError when the batch and the queue are full. `strict_max_tokens`: the client set
        max_tokens itself, so refuse one that cannot fit (otherwise generation stops at max_model_len)."""
        if self._failure is not None:
            raise EngineStopped(f"engine loop failed: {self._failure}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._admit()
            rid = self.engine.add_request(
                prompt, params, messages=messages, request_id=request_id, speculate=speculate,
                strict_max_tokens=strict_max_tokens, resume=resume,
            )  # fmt: skip
            self._streams[rid] = stream
            if self.monitor is not None:
                self.monitor.on_arrival(rid)
        self._work.set()
        finished = False
        try:
            while not finished:
                item = _coalesced(await stream.queue.get(), stream.queue)
                if isinstance(item, BaseException):
                    raise EngineStopped(f"engine loop failed: {item}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer left early: free the slot now
                self.abort(rid)

    def _admit(self) -> None:
        """Refuse a request the running batch and the bounded queue cannot hold (call holding the lock)."""
        running, waiting = len(self.engine.running), len(self.engine.waiting)
        if running + waiting >= self.engine.config.max_batch_size + self.max_queued_requests:
            raise OverloadedError(
                f"server at capacity: {running} requests running and {waiting} queued "
                f"(max_queued_requests={self.max_queued_requests})",
                retry_after_s=RETRY_AFTER_S,
            )

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def alive(self) -> bool:
        """The engine loop is running (what health probes report)."""
        return self._failure is None and self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """What a router balances on: running and waiting requests."""
        with self._lock:
            return {"running": len(self.engine.running), "waiting": len(self.engine.waiting)}

    def info(self) -> BackendInfo:
        config = self.engine.config
        return BackendInfo(
            proposer=config.proposer, verification_policy=config.verification.policy,
            max_model_len=config.max_model_len,
        )  # fmt: skip

    def shutdown(self) -> None:
        self._stopping = True
        self._work.set()
        self._thread.join(timeout=10)

    # ---- the loop -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._work.is_set() and self.engine.profile_pending:
                    # Idle on a first start: time one run of the cost profile, then look for work again.
                    with self._lock:
                        self.engine.advance_profile()
                    continue
                self._work.wait()
                with self._lock:
                    outputs = self.engine.step()
                    if self.monitor is not None:
                        self.monitor.on_step(self.engine, outputs)
                    if not self.engine.has_unfinished():
                        self._work.clear()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as err:  # never leave a client waiting on a dead loop
            log.exception("engine loop failed")
            self._failure = err
            for rid in list(self._streams):
                self._deliver(rid, err)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _coalesced(item: RequestOutput | BaseException, queue: asyncio.Queue) -> RequestOutput | BaseException:
    """`item` merged with the outputs queued behind it: a consumer that fell behind the engine (a busy
    replica streaming to many clients) sends one message for several steps instead of one per step."""
    while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
        following = queue.get_nowait()
        if isinstance(following, BaseException):
            return following
        item = following.model_copy(
            update={"token_ids": item.token_ids + following.token_ids, "text": item.text + following.text}
        )
    return item
