"""The engine under each verification policy: greedy output stays the target's own, sampled output keeps
the target's distribution when the scheduler cuts drafts on token-dependent confidences."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch
from sampling_checks import first_two_token_probs, first_two_token_pvalue

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.proposers import Draft, DraftRequest, Proposer
from dspark.sampling import SamplingParams
from dspark.scheduling import CostProfile, VerificationConfig
from dspark.scheduling.policies import CostFit, ScheduledVerification


@pytest.fixture(scope="module")
def greedy_reference(default_model, tokenizer, to_chat_ids, dev_prompts):
    prompts = [to_chat_ids(p) for p in dev_prompts[:: len(dev_prompts) // 6][:6]]
    plain = build_engine(
        EngineConfig(proposer="none", max_batch_size=4), model=default_model, tokenizer=tokenizer
    )
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    return prompts, params, [c.token_ids for c in plain.generate(prompts, params)]


@pytest.mark.parametrize("policy", ["threshold", "scheduler"])
def test_greedy_output_is_the_targets_own(default_model, tokenizer, greedy_reference, policy):
    prompts, params, expected = greedy_reference
    config = EngineConfig(
        proposer="ngram", num_speculative_tokens=6, max_batch_size=4,
        verification=VerificationConfig(policy=policy, threshold=0.2, profile_cache=False),
    )  # fmt: skip
    engine = build_engine(config, model=default_model, tokenizer=tokenizer)
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    assert engine.stats.accepted > 0  # drafts were verified and used


def test_speculation_has_one_off_switch(default_model, tokenizer, greedy_reference):
    """Proposer `none` is the only way to switch speculation off; a zero draft length or a `none` policy
    is refused. Requests that opt out (speculate=False) on a speculating engine never draft either."""
    prompts, params, expected = greedy_reference
    off = build_engine(
        EngineConfig(proposer="none", max_batch_size=4), model=default_model, tokenizer=tokenizer
    )
    assert off.proposer is None and off.policy is None
    assert [c.token_ids for c in off.generate(prompts[:2], params)] == expected[:2]
    assert off.stats.drafted == 0
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(proposer="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="policy"):
        VerificationConfig(policy="none")
    config = EngineConfig(proposer="ngram", max_batch_size=4, verification=VerificationConfig(policy="fixed"))
    opted_out = build_engine(config, model=default_model, tokenizer=tokenizer)
    for prompt in prompts[:2]:
        opted_out.add_request(prompt, params, speculate=False)
    outputs: dict[str, list[int]] = {}
    for out in opted_out.run_until_done():
        outputs.setdefault(out.request_id, []).extend(out.token_ids)
    assert list(outputs.values()) == expected[:2]
    assert opted_out.stats.drafted == 0


class ParityProposer(Proposer):
    """Drafts two tokens whose confidences depend on the tokens drawn before them.

    Position 1 is confident after an even anchor; position 2 is confident after an even first draft
    token, so the scheduler's lengths vary with the draws: the case where a careless scheduler biases
    the output (paper Appendix A). Position-1 drafts come from `first` (per anchor) to be often right.
    """

    name = "parity"
    default_num_speculative_tokens = 2

    def __init__(self, first: dict[int, torch.Tensor], vocab: int) -> None:
        self.first = first
        self.fallback = torch.zeros(vocab)
        self.fallback[torch.arange(0, 4000, 500)] = 1 / 8

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        drafts = []
        for r, k in zip(requests, max_lens, strict=True):
            anchor = r.token_ids[-1]
            rows = torch.stack([self.first.get(anchor, self.fallback), self.fallback])[:k]
            tokens = [int(torch.multinomial(row, 1, generator=r.generator)) for row in rows]
            confidences = torch.tensor([0.9 if anchor % 2 == 0 else 0.2, 0.9 if tokens[0] % 2 == 0 else 0.1])
            drafts.append(Draft(tokens, rows, confidences[:k]))
        return drafts


def test_sampled_output_with_the_scheduler_follows_the_target(default_model, tokenizer, hf_model):
    """Chi-square on (t1, t2): t2 is the verified first draft token (or the bonus when cut to 0)."""
    prompt = tokenizer.encode("The most important thing in life is")
    p1, p2 = first_two_token_probs(hf_model, prompt)
    # Draft rows near the target's: its top-8 next tokens after each likely t1, flattened toward uniform.
    first = {}
    for t1, dist in p2.items():
        values, indices = dist.topk(8)
        row = torch.zeros_like(dist, dtype=torch.float32)
        row[indices] = (0.5 * values / values.sum() + 0.5 / 8).float()
        first[t1] = row
    vocab = default_model.cfg.vocab_size
    config = EngineConfig(proposer="ngram", num_speculative_tokens=2, max_batch_size=100, max_model_len=64)
    engine = build_engine(
        config, model=default_model, tokenizer=tokenizer, proposer=ParityProposer(first, vocab)
    )
    # per request: 10 ms, +5 ms per extra token; drafting is free
    profile = CostProfile(key="t", requests=[1], tokens_per_request=[1, 2, 3], target_ms=[[10.0, 15.0, 20.0]],
                          draft_ms=[0.0])  # fmt: skip
    engine.policy = ScheduledVerification(profile, draft_gate=False)

    n = 600
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i, ignore_eos=True) for i in range(n)]
    completions = []
    for start in range(0, n, 100):
        ids = [engine.add_request(prompt, p) for p in params[start : start + 100]]
        outs: dict[str, list[int]] = {i: [] for i in ids}
        for out in engine.run_until_done():
            outs[out.request_id] += out.token_ids
        completions += [tuple(outs[i][:2]) for i in ids]
    stats = engine.stats
    assert stats.drafted_at[1] > 0 and stats.drafted_at[0] > stats.drafted_at[1]  # lengths 1 and 2 occur
    assert stats.steps > stats.drafted_at[0]  # and some requests were cut to 0
    assert stats.accepted > 0

    assert first_two_token_pvalue(completions, p1, p2) > 1e-3


def test_steps_drafting_for_sampling_requests_are_costed_as_sampled(default_model, tokenizer):
    """A step that drafts for a sampling request is costed at the profile's sampled draft time."""

    class Recording(ScheduledVerification):
        def lengths(self, confidences, shape, sources=None):
            self.sampled.append(shape.sampled)
            return super().lengths(confidences, shape, sources)

    config = EngineConfig(proposer="ngram", max_model_len=256)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer)
    profile = CostProfile(key="t", requests=[1], tokens_per_request=[1, 2, 5], target_ms=[[10.0, 11.0, 12.0]],
                          draft_ms=[0.0], sampled_draft_ms=[1.0])  # fmt: skip
    prompt = tokenizer.encode("one two three four five six, one two three four five six, one two three")
    for temperature, sampled in ((0.0, False), (0.5, True)):
        engine.policy = Recording(profile, draft_gate=False)
        engine.policy.sampled = []
        params = SamplingParams(temperature=temperature, seed=1, max_tokens=12, ignore_eos=True)
        list(engine.stream(prompt, params))
        assert engine.policy.sampled and set(engine.policy.sampled) == {sampled}


def test_the_engine_reports_each_step_its_draft_call_and_verified_tokens(default_model, tokenizer):
    """The policy learns what steps cost beyond its profile from every step the engine times: its shape
    (how many requests the draft call served), the draft tokens it verified and its seconds."""

    class Recording(ScheduledVerification):
        def observe(self, shape, verified, seconds):
            self.steps.append((shape, verified, seconds))
            super().observe(shape, verified, seconds)

    config = EngineConfig(proposer="ngram", max_model_len=256)
    engine = build_engine(config, model=default_model, tokenizer=tokenizer)
    profile = CostProfile(key="t", requests=[1], tokens_per_request=[1, 2, 5], target_ms=[[10.0, 11.0, 12.0]],
                          draft_ms=[0.0])  # fmt: skip
    engine.policy = Recording(profile, draft_gate=False)
    engine.policy.steps = []
    prompt = tokenizer.encode("one two three four five six, one two three four five six, one two three")
    list(engine.stream(prompt, SamplingParams(max_tokens=24, ignore_eos=True)))
    steps = engine.policy.steps
    assert len(steps) == engine.stats.steps  # the prompt's step, then each decoding step
    assert steps[0][0].prefill_tokens == len(prompt) and all(s.prefill_tokens == 0 for s, _, _ in steps[1:])
    assert steps[0][0].num_requests == 0  # the prompt's step decodes nothing yet
    assert all(s.num_requests == 1 and not s.sampled for s, _, _ in steps[1:])
    called = [s.drafted for s, _, _ in steps[1:]]  # lookup is called unless one token is left to make
    assert set(called) <= {0, 1} and sum(called) >= len(called) - 1
    assert sum(v for _, v, _ in steps) == engine.stats.drafted > 0
    assert all(seconds > 0 for _, _, seconds in steps)
    # Each decoding step reads the positions cached before it: the prompt and the draft tokens its step
    # accepted, then every token committed since (the fed token and the accepted ones: 1 to 1 + verified).
    assert len(prompt) <= steps[1][0].cached <= len(prompt) + steps[0][1]
    for (before, verified, _), (after, _, _) in itertools.pairwise(steps[1:]):
        assert 1 <= after.cached - before.cached <= 1 + verified
    learnt = engine.policy.costs.fit((True, False))
    assert learnt != CostFit() and 0.5 <= learnt.scale <= 2.0  # learnt from the steps, clipped to [0.5, 2]
