"""A drafter behind a transport (the disaggregated placement) drafts exactly what it would colocated, and a
failing drafter (raising, past its deadline, restarted empty) degrades to plain decoding, never fails."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
import torch

from dspark.assembly import build_engine, build_proposer, draft_worker_config, with_lookup
from dspark.engine import EngineConfig
from dspark.proposers.base import Draft
from dspark.proposers.remote import DraftCall, ProposerHost, ProposerInfo, RemoteProposer, RemoteStateLost
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig


def _crossed(value):
    """As if sent to another process: arguments and drafts are pickled both ways."""
    return pickle.loads(pickle.dumps(value))


def pickled_transport(host: ProposerHost):
    calls: list[DraftCall] = []

    def transport(call: DraftCall, timeout: float | None):
        calls.append(call)
        return _crossed(host.handle(_crossed(call)))

    return transport, calls


PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Write a haiku about autumn leaves.",
    "Count from one to twelve in words.",
]


def _config(proposer_name: str) -> EngineConfig:
    return EngineConfig(  # fixed: two scheduler instances would each keep their own gate state
        max_batch_size=4, max_model_len=512, proposer=proposer_name, num_speculative_tokens=4,
        verification=VerificationConfig(policy="fixed"),
    )  # fmt: skip


@pytest.mark.parametrize("proposer_name", ["ngram", "dspark", "hybrid"])
def test_remote_drafter_matches_colocated(default_model, tokenizer, proposer_name):
    """A hybrid's worker hosts only its draft model; prompt lookup stays with the engine."""
    config = _config(proposer_name)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    colocated = build_engine(config, model=default_model, tokenizer=tokenizer)
    expected = colocated.generate(PROMPTS, params)

    host = ProposerHost(build_proposer(draft_worker_config(config), default_model))
    transport, calls = pickled_transport(host)
    remote = RemoteProposer(transport, host.describe())
    proposer = with_lookup(config, remote) if proposer_name == "hybrid" else remote
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=proposer)
    got = engine.generate(PROMPTS, params)

    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.spec for c in got] == [c.spec for c in expected]  # same drafts, same acceptance
    assert calls and sum(len(c.propose) for c in calls) > 0
    assert remote.failures == remote.fallbacks == 0
    # Finished requests are dropped on the remote side with the next call.
    remote.propose([], [])
    assert host.requests == {}
    if proposer_name != "ngram":
        assert host.proposer.contexts == {}


# ---- faults -----------------------------------------------------------------------------------------------


class FlakyWorker:
    """A draft worker as Ray runs one: calls execute one at a time in submission order on the worker's
    thread, and the caller waits at most the deadline (a call past it still runs, later). Faults are
    injected per call number: 'raise' (the drafter raises), 'slow' (the call outlives its deadline, then
    applies), 'restart' (the worker comes back empty before the call, as Ray restarts a dead actor)."""

    def __init__(self, make_host, faults: dict[int, str], slow_s: float = 0.2) -> None:
        self.make_host = make_host
        self.host = make_host()
        self.faults = faults
        self.slow_s = slow_s
        self.calls = 0
        self.executor = ThreadPoolExecutor(max_workers=1)

    def transport(self, call: DraftCall, timeout: float | None) -> list[Draft]:
        fault = self.faults.get(self.calls)
        self.calls += 1
        future = self.executor.submit(self._run, _crossed(call), fault)
        try:
            return _crossed(future.result(timeout=timeout))
        except FutureTimeout:
            raise TimeoutError(f"draft call past its {timeout}s deadline") from None

    def _run(self, call: DraftCall, fault: str | None) -> list[Draft]:
        if fault == "restart":
            self.host = self.make_host()
        if fault == "slow":
            import time

            time.sleep(self.slow_s)
        if fault == "raise":
            raise RuntimeError("drafter crashed")
        return self.host.handle(call)


def _run_with_faults(engine, prompts, params, fault_calls: set[int], worker: FlakyWorker):
    """Generate step by step; returns token ids in prompt order and the accepted drafts after the last
    injected fault."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    accepted_at_last_fault, step_fallbacks = None, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step_fallbacks += engine.last_step.drafter_fallbacks
        if accepted_at_last_fault is None and worker.calls > max(fault_calls):
            accepted_at_last_fault = engine.stats.accepted
    assert accepted_at_last_fault is not None, "generation ended before every fault was injected"
    return [tokens[i] for i in ids], engine.stats.accepted - accepted_at_last_fault, step_fallbacks


FAULTS = {
    "raises": {3: "raise"},
    "misses_deadline": {3: "slow", 4: "slow"},
    "restarted_between_calls": {3: "restart"},
    "raises_then_restarts": {3: "raise", 4: "restart"},
}


@pytest.mark.parametrize("kind", FAULTS)
def test_ngram_worker_faults_degrade_to_plain_decoding_and_recover(default_model, tokenizer, kind):
    config = _config("ngram")
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain = build_engine(config.model_copy(update={"proposer": "none"}), model=default_model,
                         tokenizer=tokenizer).generate(PROMPTS, params)  # fmt: skip

    worker = FlakyWorker(lambda: ProposerHost(build_proposer(config, default_model)), FAULTS[kind])
    remote = RemoteProposer(worker.transport, worker.host.describe(), deadline_s=0.05, retry_after_s=0.0)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=remote)
    got, accepted_after, step_fallbacks = _run_with_faults(engine, PROMPTS, params, set(FAULTS[kind]), worker)

    assert got == [c.token_ids for c in plain]  # greedy output token-identical
    assert remote.failures >= 1
    assert remote.fallbacks >= len(PROMPTS) and step_fallbacks == remote.fallbacks
    assert accepted_after > 0, "token-only requests resynchronise and draft again"
    assert remote.healthy
    remote.propose([], [])
    worker.executor.shutdown(wait=True)
    assert worker.host.requests == {}  # the rebuilt copies were released too


def test_conditioned_drafter_fault_finishes_plainly_and_new_requests_draft(default_model, tokenizer):
    """DSpark's per-request context (target hidden states) is lost with its worker: the running requests
    finish without drafts; requests that arrive after the fault draft again."""
    config = _config("dspark")
    params = SamplingParams(temperature=0.0, max_tokens=30)
    plain_engine = build_engine(config.model_copy(update={"proposer": "none"}), model=default_model,
                                tokenizer=tokenizer)  # fmt: skip
    plain = plain_engine.generate(PROMPTS, params)
    later = ["Name three primary colours.", PROMPTS[0]]
    plain_later = plain_engine.generate(later, params)

    worker = FlakyWorker(lambda: ProposerHost(build_proposer(config, default_model)), {4: "restart"})
    remote = RemoteProposer(worker.transport, worker.host.describe(), deadline_s=5.0, retry_after_s=0.0)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=remote)
    got, _, _ = _run_with_faults(engine, PROMPTS, params, {4}, worker)
    assert got == [c.token_ids for c in plain]
    assert remote.failures == 1 and remote.fallbacks > len(PROMPTS)  # every later step of each request
    assert remote._abandoned == set()  # finished requests leave no state behind

    fallbacks = remote.fallbacks
    after = engine.generate(later, params)
    assert [c.token_ids for c in after] == [c.token_ids for c in plain_later]
    assert remote.fallbacks == fallbacks
    assert sum(c.spec.drafted for c in after) > 0 and sum(c.spec.accepted for c in after) > 0
    worker.executor.shutdown(wait=True)


class _Request:
    def __init__(self, request_id: str, token_ids: list[int]) -> None:
        self.request_id, self.token_ids = request_id, token_ids
        self.params, self.generator = SamplingParams(), None


def test_backoff_after_a_fault_then_full_resync():
    """After a fault the worker is skipped for retry_after_s (doubling while faults go on); the first call
    that gets through releases the remote copy and resends the whole history."""
    from dspark.proposers import NgramProposer

    host, now, down = ProposerHost(NgramProposer()), [0.0], [True]
    sent: list[DraftCall] = []

    def transport(call: DraftCall, timeout: float | None) -> list[Draft]:
        sent.append(call)
        if down[0]:
            raise ConnectionError("worker unreachable")
        return host.handle(_crossed(call))

    remote = RemoteProposer(transport, host.describe(), retry_after_s=1.0, max_retry_after_s=3.0,
                            clock=lambda: now[0])  # fmt: skip
    request = _Request("a", [5, 6, 7, 5, 6])
    assert remote.propose([request], [3]) == [Draft([])] and len(sent) == 1
    assert remote.propose([request], [3]) == [Draft([])] and len(sent) == 1  # paused: not called
    now[0] = 1.0
    remote.propose([request], [3])  # the retry fails too: the pause doubles
    assert len(sent) == 2 and remote.failures == 2 and remote.fallbacks == 3
    now[0] = 2.5
    remote.propose([request], [3])
    assert len(sent) == 2
    now[0], down[0] = 3.0, False
    request.token_ids += [7]
    (draft,) = remote.propose([request], [3])
    assert draft.tokens == [5, 6, 7] and remote.healthy
    resync = sent[-1]
    assert resync.released == ["a"]
    assert resync.updates[0].start == 0 and resync.updates[0].new_tokens == request.token_ids
    assert host.requests["a"].token_ids == request.token_ids


def test_host_refuses_updates_it_cannot_continue():
    from dspark.proposers import NgramProposer

    host = ProposerHost(NgramProposer())
    info = host.describe()
    assert info == ProposerInfo("ngram", 4, ())
    remote = RemoteProposer(lambda call, timeout: host.handle(call), info)
    request = _Request("a", [1, 2, 3])
    remote.propose([request], [2])
    request.token_ids += [1, 2]
    restarted = ProposerHost(NgramProposer())
    with pytest.raises(RemoteStateLost):
        restarted.handle(DraftCall([remote._update(request)], [], ["a"], [2]))
    assert restarted.requests == {}  # nothing applied


def test_feature_history_of_an_unsent_request_survives_a_fault():
    """A conditioned request whose whole history rode in the failed call keeps it for the next call."""
    info = ProposerInfo("conditioned", 2, (1,))
    attempts: list[DraftCall] = []

    def transport(call: DraftCall, timeout: float | None) -> list[Draft]:
        attempts.append(call)
        if len(attempts) == 1:
            raise RuntimeError("down")
        return [Draft([]) for _ in call.propose]

    remote = RemoteProposer(transport, info, retry_after_s=0.0)
    old, new = _Request("old", [1, 2]), _Request("new", [3, 4, 5])
    remote._synced["old"] = 2  # already on the remote side
    features = torch.randn(2, 4)
    remote.observe(new, features)
    remote.propose([old, new], [2, 2])
    assert remote._abandoned == {"old"}
    remote.propose([old, new], [2, 2])
    retry = attempts[-1]
    assert retry.propose == ["new"] and set(retry.released) == {"old", "new"}
    assert torch.equal(retry.updates[0].features, features) and retry.updates[0].start == 0
