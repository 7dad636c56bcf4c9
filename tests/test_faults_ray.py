"""Drafter faults on a local Ray cluster: killing the disaggregated draft worker mid-generation costs
speculation, not requests. Greedy output stays token-identical to plain decoding, every request finishes in
bounded time, and drafting resumes once Ray has restarted the worker."""

from __future__ import annotations

import time

import pytest

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeConfig

ray = pytest.importorskip("ray")

PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Count from one to twelve in words.",
]
PARAMS = SamplingParams(max_tokens=48)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


def _generate(engine, prompts, on_step=None, limit_s: float = 60.0) -> list[list[int]]:
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    tokens = {i: [] for i in ids}
    began, steps = time.monotonic(), 0
    while engine.has_unfinished():
        assert time.monotonic() - began < limit_s, "requests did not finish in bounded time"
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        steps += 1
        if on_step is not None:
            on_step(steps)
    return [tokens[i] for i in ids]


def _wait_until_restarted(actor, timeout: float = 60.0) -> None:
    """Until a killed actor answers again: while Ray restarts it, calls fail with ActorUnavailableError
    (how long depends on the machine's load), which callers are meant to retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.describe.remote(), timeout=timeout)
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_killed_draft_worker_degrades_to_plain_decoding_and_recovers(local_ray, default_model, tokenizer):
    from deployments.workers import start_replica

    plain = build_engine(EngineConfig(proposer="none", max_batch_size=4), model=default_model,
                         tokenizer=tokenizer)  # fmt: skip
    expected = [c.token_ids for c in plain.generate(PROMPTS, PARAMS)]

    cfg = ServeConfig.model_validate({
        "engine": {"max_batch_size": 4, "max_model_len": 1024, "proposer": "ngram",
                   "num_speculative_tokens": 4, "verification": {"policy": "fixed"}},
        "drafter_placement": "disaggregated", "num_cpus": 1, "drafter_num_cpus": 1,
    })  # fmt: skip
    workers = start_replica(cfg)
    try:
        engine, remote = workers.engine, workers.engine.proposer
        assert remote.name == "ngram@remote"
        accepted_before_kill = []

        def kill_after_a_few_steps(step: int) -> None:
            if step == 5:
                accepted_before_kill.append(engine.stats.accepted)
                ray.kill(workers.drafter, no_restart=False)

        assert _generate(engine, PROMPTS, kill_after_a_few_steps) == expected
        assert accepted_before_kill and accepted_before_kill[0] > 0, "it drafted before the kill"
        assert remote.failures >= 1 and remote.fallbacks >= len(PROMPTS)

        # Ray restarts the worker (an empty host): the next requests draft through it again.
        _wait_until_restarted(workers.drafter)
        time.sleep(max(0.0, remote.retry_at - time.monotonic()))  # the pause after the last fault
        failures, accepted = remote.failures, engine.stats.accepted
        assert _generate(engine, PROMPTS) == expected
        assert remote.failures == failures and remote.healthy
        assert engine.stats.accepted > accepted
    finally:
        workers.shutdown()


@ray.remote
class HangingDraftWorker:
    """A draft worker that answers `describe` and then never answers a draft call."""

    def describe(self):
        from dspark.proposers.remote import ProposerInfo

        return ProposerInfo("ngram", 4, ())

    def handle(self, call):
        time.sleep(3600)


def test_hanging_draft_worker_costs_speculation_not_requests(local_ray, default_model, tokenizer):
    """Every draft call misses its deadline: requests finish in bounded time, plainly, and token-identical."""
    from deployments.workers import ActorTransport
    from dspark.proposers.remote import RemoteProposer

    plain = build_engine(EngineConfig(proposer="none", max_batch_size=4), model=default_model,
                         tokenizer=tokenizer)  # fmt: skip
    expected = [c.token_ids for c in plain.generate(PROMPTS, PARAMS)]
    worker = HangingDraftWorker.options(num_cpus=0.1).remote()
    remote = RemoteProposer(ActorTransport(worker), ray.get(worker.describe.remote()), deadline_s=0.2)
    config = EngineConfig(proposer="ngram", max_batch_size=4, verification={"policy": "fixed"})
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=remote)
    began = time.monotonic()
    assert _generate(engine, PROMPTS, limit_s=30) == expected
    assert time.monotonic() - began < 30
    assert remote.failures >= 1 and remote.fallbacks >= len(PROMPTS) and engine.stats.accepted == 0
    ray.kill(worker)


# ---- stopping: SIGTERM drains in-flight requests ----------------------------------------------------------


@pytest.mark.parametrize("second_signal", [False, True])
def test_sigterm_drains_before_serve_shuts_down(monkeypatch, second_signal):
    """serve_forever answers SIGTERM by draining the application (within the grace period), then shuts
    Serve down; a second signal cuts the drain short."""
    import os
    import signal
    import threading

    from deployments import launch

    drain_s = 60.0 if second_signal else 0.3
    calls: list[str] = []
    monkeypatch.setattr(launch, "start", lambda *args: calls.append("start"))

    class FakeServe:
        @staticmethod
        def delete(app):
            calls.append(f"delete {app}")
            time.sleep(drain_s)
            calls.append("drained")

        @staticmethod
        def shutdown():
            calls.append("shutdown")

    monkeypatch.setattr(launch, "serve", FakeServe)

    def send_signals():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        if second_signal:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=send_signals, daemon=True).start()
        began = time.monotonic()
        launch.serve_forever(ServeConfig(), 8000, 9000, "127.0.0.1")
        took = time.monotonic() - began
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if second_signal:
        assert calls == ["start", "delete dspark", "shutdown"] and took < 5
    else:
        assert calls == ["start", "delete dspark", "drained", "shutdown"]


def test_drain_lets_an_in_flight_request_finish(local_ray):
    import socket
    import threading

    from ray import serve

    from deployments.launch import drain

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:

        @serve.deployment(graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=0.2)
        class Slow:
            async def __call__(self, seconds: float) -> str:
                import asyncio

                await asyncio.sleep(seconds)
                return "finished"

        handle = serve.run(Slow.bind(), name="dspark", route_prefix=None)
        assert handle.remote(0.0).result(timeout_s=60) == "finished"
        in_flight = handle.remote(3.0)
        time.sleep(0.5)
        drained: list[bool] = []
        began = time.monotonic()
        stopper = threading.Thread(target=lambda: drained.append(drain("dspark", grace_s=60)))
        stopper.start()
        assert in_flight.result(timeout_s=60) == "finished"  # not cut off by the stop
        stopper.join(60)
        assert drained == [True] and time.monotonic() - began >= 2.0
        assert "dspark" not in serve.status().applications
    finally:
        serve.shutdown()
