"""The hybrid proposer: prompt lookup first, the draft model for the rest; lossless in the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dspark.assembly import build_engine
from dspark.drafters.dspark.checkpoint import SHIPPED_DRAFTER
from dspark.drafters.dspark.proposer import DSparkProposer
from dspark.engine import Engine, EngineConfig
from dspark.proposers import Draft, HybridProposer, NgramProposer, Proposer
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig
from dspark.scheduling.cost_profile import CostProfile
from dspark.scheduling.policies import ScheduledVerification


@dataclass
class Req:
    request_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None


class CountingModel(Proposer):
    """A stand-in draft model: drafts [7, 7, ...] with confidences, records whom it was asked about."""

    name = "counting"
    default_num_speculative_tokens = 5
    hidden_layers = (1, 2)

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.observed: list[str] = []
        self.released: list[str] = []

    def propose(self, requests, max_lens):
        self.asked += [r.request_id for r in requests]
        return [Draft([7] * k, confidences=torch.full((k,), 0.5)) for k in max_lens]

    def observe(self, request, features):
        self.observed.append(request.request_id)

    def release(self, request):
        self.released.append(request.request_id)


def test_long_lookup_matches_skip_the_model():
    model = CountingModel()
    hybrid = HybridProposer(NgramProposer(1, 4), model, min_match=2)
    assert hybrid.default_num_speculative_tokens == 5 and hybrid.hidden_layers == (1, 2)
    requests = [
        Req("copy", [1, 2, 3, 4, 9, 1, 2, 3]),  # suffix (1, 2, 3) matched: lookup drafts 4, 9, 1
        Req("short", [5, 6, 8, 6]),  # only a 1-token match: the model drafts
        Req("none", [10, 11, 12]),  # no match at all: the model drafts
    ]
    drafts = hybrid.propose(requests, [3, 3, 2])
    assert model.asked == ["short", "none"]
    assert drafts[0].tokens == [4, 9, 1] and drafts[0].confidences is None and drafts[0].scores == [3.0] * 3
    assert drafts[1].tokens == [7, 7, 7] and drafts[1].confidences is not None
    assert drafts[2].tokens == [7, 7]
    assert (hybrid.lookup_drafts, hybrid.model_calls) == (1, 2)
    hybrid.observe(requests[1], torch.zeros(1, 4))
    hybrid.release(requests[1])
    assert model.observed == ["short"] and model.released == ["short"]


def test_an_empty_model_draft_keeps_the_lookup_draft():
    class Silent(CountingModel):
        def propose(self, requests, max_lens):
            return [Draft([]) for _ in requests]

    hybrid = HybridProposer(NgramProposer(1, 4), Silent(), min_match=3)
    draft = hybrid.propose([Req("r", [5, 6, 8, 6])], [2])[0]
    assert draft.tokens == [8, 6]  # the 1-token lookup match is better than nothing


def test_min_match_is_validated():
    with pytest.raises(ValueError, match="min_match"):
        HybridProposer(NgramProposer(), CountingModel(), min_match=0)


@pytest.mark.parametrize("policy", ["fixed", "scheduler"])
def test_hybrid_greedy_output_is_the_targets_own(default_model, tokenizer, to_chat_ids, dev_prompts, policy):
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=4), model=default_model, tokenizer=tokenizer
    )
    config = EngineConfig(proposer="hybrid", max_batch_size=4, verification=VerificationConfig(policy=policy))
    spec = build_engine(config, model=default_model, tokenizer=tokenizer)
    assert isinstance(spec.proposer, HybridProposer) and isinstance(spec.proposer.model, DSparkProposer)
    assert spec.num_speculative_tokens == DSparkProposer.load(SHIPPED_DRAFTER, default_model).draft_length
    prompts = [to_chat_ids(p) for p in dev_prompts[:: len(dev_prompts) // 4][:4]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    assert [c.token_ids for c in spec.generate(prompts, params)] == expected
    if policy == "fixed":  # every draft verified: both sources really drafted
        assert spec.stats.accepted > 0
        assert spec.proposer.model_calls > 0 and spec.proposer.lookup_drafts > 0


class SizedCalls:
    """Mixin for a proposer: records how many requests each propose call drafted for."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[int] = []

    def propose(self, requests, max_lens):
        self.calls.append(len(requests))
        return super().propose(requests, max_lens)


def _profile(target_ms: list[list[float]], draft_ms: list[float]) -> CostProfile:
    return CostProfile(
        key="test", requests=[1, 4], tokens_per_request=[1, 2, 5], target_ms=target_ms, draft_ms=draft_ms
    )


def _assert_explored_only(calls: list[int], steps: int) -> None:
    """After the first look (nothing known yet), a gated source drafts only to explore: one request at a
    time, at most every 4th step."""
    later = calls[1:]
    assert later and all(n == 1 for n in later)
    assert len(later) <= steps // 4


def _run_gated_hybrid(
    default_model, tokenizer, hybrid: HybridProposer, profile: CostProfile
) -> tuple[Engine, int]:
    """Four repetitive prompts through a hybrid engine scheduled on `profile` (exploring every 4 gated
    steps); checks the output is plain decoding's; returns the engine and its number of steps."""
    config = EngineConfig(
        proposer="hybrid", max_batch_size=4, num_speculative_tokens=4,
        verification=VerificationConfig(policy="fixed"),  # no profile measured: the test brings its own
    )  # fmt: skip
    engine = build_engine(config, model=default_model, tokenizer=tokenizer, proposer=hybrid)
    # The profile is the truth here: measured steps (cheaper than its dear verification) must not correct it.
    engine.policy = ScheduledVerification(profile, draft_gate=True, explore_every=4, measured_costs=False)
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=4), model=default_model, tokenizer=tokenizer
    )
    prompts = [[5 + i, 17, 23, 42, 5 + i, 17, 23, 42, 5 + i, 17, 23] for i in range(4)]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    ids = [engine.add_request(p, params) for p in prompts]
    got, steps = {i: [] for i in ids}, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert [got[i] for i in ids] == expected
    return engine, steps


def test_a_model_that_cannot_pay_is_gated_while_lookup_drafts_go_on(default_model, tokenizer):
    """The scheduler gates the hybrid's two parts apart: with a draft model far too slow to pay, it is only
    called to explore (one request at a time), while the free lookup drafts keep being verified."""

    class SizedModel(SizedCalls, CountingModel):
        pass

    model = SizedModel()
    hybrid = HybridProposer(NgramProposer(1, 4), model)
    slow_model = _profile([[10.0, 11.0, 14.0], [20.0, 24.0, 30.0]], draft_ms=[1000.0, 4000.0])
    engine, steps = _run_gated_hybrid(default_model, tokenizer, hybrid, slow_model)
    _assert_explored_only(model.calls, steps)
    assert hybrid.lookup_drafts > 0 and engine.stats.accepted > 0


def test_lookup_is_gated_too_where_no_verification_can_pay(default_model, tokenizer):
    """Prompt lookup is free, but its per-step work is not: where the profile makes every verified token cost
    more than it yields, the gate skips lookup as well (one request explores now and then), and the output
    is still the target's own."""

    class SizedLookup(SizedCalls, NgramProposer):
        pass

    lookup = SizedLookup(1, 4)
    hybrid = HybridProposer(lookup, CountingModel())
    costly_verification = _profile([[10.0, 100.0, 400.0], [20.0, 400.0, 1600.0]], draft_ms=[1.0, 2.0])
    engine, steps = _run_gated_hybrid(default_model, tokenizer, hybrid, costly_verification)
    _assert_explored_only(lookup.calls, steps)
    # The first look's at most: verifying does not pay here.
    assert engine.stats.drafted <= 4
