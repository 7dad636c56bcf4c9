"""A drafter behind a transport (the disaggregated placement) drafts exactly what it would colocated."""

from __future__ import annotations

import pickle

import pytest

from dspark.assembly import build_engine, build_proposer
from dspark.engine import EngineConfig
from dspark.proposers.remote import DraftCall, ProposerHost, RemoteProposer
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig


def pickled_transport(host: ProposerHost):
    """Every call crosses a process-like boundary: arguments and drafts are pickled both ways."""
    calls: list[DraftCall] = []

    def transport(call: DraftCall):
        calls.append(call)
        return pickle.loads(pickle.dumps(host.handle(pickle.loads(pickle.dumps(call)))))

    return transport, calls


PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Write a haiku about autumn leaves.",
    "Count from one to twelve in words.",
]


@pytest.mark.parametrize("proposer_name", ["ngram", "dspark"])
def test_remote_drafter_matches_colocated(default_model, tokenizer, proposer_name):
    config = EngineConfig(  # fixed: two scheduler instances would each keep their own gate state
        max_batch_size=4, max_model_len=512, proposer=proposer_name, num_speculative_tokens=4,
        verification=VerificationConfig(policy="fixed"),
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=40)
    colocated = build_engine(config, model=default_model, tokenizer=tokenizer)
    expected = colocated.generate(PROMPTS, params)

    host = ProposerHost(build_proposer(config, default_model))
    transport, calls = pickled_transport(host)
    remote = RemoteProposer(transport, host.describe())
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=remote)
    got = engine.generate(PROMPTS, params)

    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.spec for c in got] == [c.spec for c in expected]  # same drafts, same acceptance
    assert calls and sum(len(c.propose) for c in calls) > 0
    # Finished requests are dropped on the remote side with the next call.
    remote.propose([], [])
    assert host.requests == {}
    if proposer_name == "dspark":
        assert host.proposer.contexts == {}
