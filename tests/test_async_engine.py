"""The async engine's hand-off between the event loop and the engine thread, with a fake slow engine: the
loop never waits for a step, adds and aborts run between steps, errors reach the caller, and nothing hangs
when the loop dies or shuts down."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

import pytest

from dspark.engine import EngineConfig, RequestOutput
from dspark.errors import InvalidRequestError
from dspark.serving.async_engine import AsyncEngine, EngineStopped

STEP_S = 0.3  # a slow step: a loop blocked on it would show


class SlowEngine:
    """Each step takes STEP_S and emits one token per running request; requests finish after 3 tokens."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.config = EngineConfig(max_batch_size=4)
        self.running: list[list] = []  # [request_id, tokens so far]
        self.waiting: deque = deque()
        self.profile_pending = False
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.thread_ids: set[int] = set()
        self._ids = itertools.count()

    def add_request(self, prompt, params=None, **_) -> str:
        self.thread_ids.add(threading.get_ident())
        if prompt == "bad":
            raise InvalidRequestError("prompt", "is bad")
        rid = f"r{next(self._ids)}"
        self.running.append([rid, 0])
        return rid

    def abort(self, request_id: str) -> None:
        self.thread_ids.add(threading.get_ident())
        self.aborted.append(request_id)
        self.running = [r for r in self.running if r[0] != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("step failed")
        time.sleep(STEP_S)
        outputs = []
        for r in self.running:
            r[1] += 1
            outputs.append(RequestOutput(request_id=r[0], token_ids=[r[1]], text="x", finished=r[1] == 3))
        self.running = [r for r in self.running if r[1] < 3]
        return outputs


async def _until(condition, timeout_s: float = 2.5) -> None:
    """Poll `condition` (the engine thread acts between steps) until it holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _max_loop_lag(until: asyncio.Future, tick_s: float = 0.01) -> float:
    """The longest the event loop took to come back from a `tick_s` sleep while `until` runs."""
    lag = 0.0
    while not until.done():
        began = time.perf_counter()
        await asyncio.sleep(tick_s)
        lag = max(lag, time.perf_counter() - began - tick_s)
    return lag


def test_adds_during_steps_never_block_the_event_loop():
    fake = SlowEngine()
    engine = AsyncEngine(fake)  # type: ignore[arg-type]

    async def client() -> list[int]:
        return [t for out in [o async for o in engine.generate("hi")] for t in out.token_ids]

    async def main():
        first = asyncio.ensure_future(client())
        await asyncio.sleep(STEP_S / 3)  # the engine is inside a step now
        rest = asyncio.gather(*(client() for _ in range(3)))
        lag = await _max_loop_lag(rest)
        return await first, await rest, lag

    try:
        first, rest, lag = asyncio.run(main())
    finally:
        engine.shutdown()
    assert first == [1, 2, 3] and all(tokens == [1, 2, 3] for tokens in rest)
    assert lag < STEP_S / 2  # a loop waiting for the step's lock would lag a whole step
    assert fake.thread_ids == {engine._thread.ident}  # only the engine thread touched the engine


def test_invalid_request_reaches_the_caller_and_the_next_succeeds():
    engine = AsyncEngine(SlowEngine())  # type: ignore[arg-type]

    async def main():
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate("bad"):
                pass
        return [out async for out in engine.generate("good")]

    try:
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outputs[-1].finished


def test_a_consumer_that_leaves_aborts_its_request():
    fake = SlowEngine()
    engine = AsyncEngine(fake)  # type: ignore[arg-type]

    async def main():
        stream = engine.generate("hi")
        await anext(stream)
        await stream.aclose()  # the client went away after one token
        await _until(lambda: fake.aborted)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert fake.aborted == ["r0"]


def test_a_dead_loop_fails_waiting_and_new_requests():
    engine = AsyncEngine(SlowEngine(fail_at_step=1))  # type: ignore[arg-type]

    async def main():
        with pytest.raises(EngineStopped):
            async for _ in engine.generate("hi"):
                pass
        with pytest.raises(EngineStopped):
            async for _ in engine.generate("again"):
                pass

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=10))
    finally:
        engine.shutdown()
    assert engine.failed and not engine.alive


def test_requests_after_shutdown_are_refused():
    engine = AsyncEngine(SlowEngine())  # type: ignore[arg-type]
    engine.shutdown()

    async def main():
        with pytest.raises(EngineStopped):
            async for _ in engine.generate("hi"):
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=5))


def test_stream_interval_merges_steps_but_not_the_first_or_last_message():
    engine = AsyncEngine(SlowEngine(), stream_interval_s=STEP_S * 1.5)  # type: ignore[arg-type]

    async def main():
        return [out async for out in engine.generate("hi")]

    try:
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    # token 1 at once; token 2 one step later is held (within the interval); the final step carries it
    assert [o.token_ids for o in outputs] == [[1], [2, 3]]
    assert outputs[-1].finished and "".join(o.text for o in outputs) == "xxx"


def test_stream_interval_grows_with_the_streams_up_to_its_ceiling():
    engine = AsyncEngine(SlowEngine(), stream_interval_s=0.1, max_stream_interval_s=0.5)  # type: ignore[arg-type]
    try:
        intervals = []
        for n in (0, 1, 2, 4, 8, 32):
            engine._streams = {f"r{i}": None for i in range(n)}  # type: ignore[misc]
            intervals.append(engine.stream_interval())
        engine._streams = {}
    finally:
        engine.shutdown()
    assert intervals == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert AsyncEngine.stream_interval(_Intervals(0.0, 0.5, 8)) == 0.0  # 0: a message per step, any load
    assert AsyncEngine.stream_interval(_Intervals(0.1, 0.0, 8)) == 0.1  # a ceiling below the floor: the floor


@dataclass
class _Intervals:
    stream_interval_s: float
    max_stream_interval_s: float
    streams: int

    @property
    def _streams(self) -> dict:
        return dict.fromkeys(range(self.streams))


def test_a_caller_cancelled_before_admission_leaves_nothing_behind():
    fake = SlowEngine()
    engine = AsyncEngine(fake)  # type: ignore[arg-type]

    async def main():
        busy = asyncio.ensure_future(anext(engine.generate("busy")))  # keeps the engine inside a step
        await busy
        task = asyncio.ensure_future(anext(engine.generate("late")))
        await asyncio.sleep(0.01)  # submitted; the engine adds it after its current step
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: "r1" in fake.aborted)  # the add runs, then the abort the caller left behind

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert "r1" in fake.aborted and "r1" not in engine._streams
