"""Cost profile, online acceptance estimator and verification policies, without the engine."""

from __future__ import annotations

import numpy as np
import pytest

from dspark.proposers import NgramProposer
from dspark.scheduling import (
    CostProfile,
    OnlineAcceptanceEstimator,
    StepShape,
    VerificationConfig,
    build_policy,
    cost_profile,
    load_or_measure,
    schedule_prefixes,
)
from dspark.scheduling.cost_profile import (
    LONG_CONTEXT,
    PROFILE_CONTEXT,
    ProfileMeasurement,
    cached_or_measurement,
    plausibility,
    profile_context,
    profile_key,
    profile_target,
)
from dspark.scheduling.policies import (
    COST_SMOOTHING,
    COST_WARMUP,
    DRAFT_CALL_MARGIN,
    CostFit,
    MeasuredCosts,
    ScheduledVerification,
)


def _profile(target_ms, draft_ms=None, requests=(1, 4), tokens=(1, 2, 5)) -> CostProfile:
    return CostProfile(
        key="test", requests=list(requests), tokens_per_request=list(tokens), target_ms=target_ms,
        draft_ms=draft_ms if draft_ms is not None else [0.0] * len(requests),
    )  # fmt: skip


# ---- cost profile -----------------------------------------------------------------------------------------


def test_profile_interpolates_tokens_and_requests():
    profile = _profile([[10.0, 12.0, 30.0], [20.0, 40.0, 100.0]], draft_ms=[1.0, 3.0])
    assert profile.target_seconds(1, 1) == pytest.approx(0.010)
    assert profile.target_seconds(1, 3) == pytest.approx((12 + (30 - 12) / 3) / 1000)  # 3 tokens: 1/3 of 2..5
    assert profile.target_seconds(1, 8) == pytest.approx((30 + 6 * 3) / 1000)  # extrapolated at 6 ms/token
    assert profile.target_seconds(4, 8) == pytest.approx(0.040)  # 4 requests x 2 tokens
    # 2 requests lie halfway between 1 and 4 in log space
    assert profile.target_seconds(2, 2) == pytest.approx((10 + 20) / 2 / 1000)
    assert profile.target_seconds(8, 8) == pytest.approx(0.040)  # past the largest count: linear in n
    assert profile.draft_seconds(8) == pytest.approx(0.006)
    assert profile.step_seconds(1, 2) == pytest.approx(0.013)
    assert profile.step_seconds(1, 2, drafted=0) == pytest.approx(0.012)
    assert profile.steps_per_second(4)(8) == pytest.approx(1 / 0.043)


def test_sampled_draft_calls_cost_what_the_profile_measured_for_them():
    """Steps whose draft call serves a sampling request pay the sampled draft time; a profile without one
    (a proposer that draws the same either way) charges the greedy time."""
    profile = _profile([[10.0, 12.0, 30.0], [20.0, 40.0, 100.0]], draft_ms=[1.0, 3.0])
    sampled = profile.model_copy(update={"sampled_draft_ms": [4.0, 9.0]})
    assert sampled.step_seconds(1, 2) == pytest.approx(0.013)
    assert sampled.step_seconds(1, 2, sampled=True) == pytest.approx(0.016)
    assert sampled.steps_per_second(4, sampled=True)(8) == pytest.approx(1 / 0.049)
    assert sampled.step_seconds(4, 4, drafted=0, sampled=True) == pytest.approx(0.020)
    assert profile.step_seconds(1, 2, sampled=True) == pytest.approx(0.013)
    assert plausibility(sampled).ok
    assert not plausibility(sampled.model_copy(update={"sampled_draft_ms": [9.0, 4.0]})).ok
    assert not plausibility(sampled.model_copy(update={"sampled_draft_ms": [4.0]})).ok


def test_sampled_steps_pay_for_every_row_they_verify():
    """A step in which a request samples pays `sampled_row_ms` per row (the target's filtered distribution is
    computed for each), so a long sampled verification costs more than a greedy one of the same length, and
    the scheduler verifies less for sampling requests when rows are dear."""
    profile = _profile([[10.0, 12.0, 30.0], [20.0, 40.0, 100.0]], draft_ms=[1.0, 3.0])
    rows = profile.model_copy(update={"sampled_row_ms": 0.5})
    assert rows.step_seconds(1, 2, sampled=True) == pytest.approx(0.013 + 0.001)
    assert rows.step_seconds(1, 2) == pytest.approx(0.013)
    assert rows.steps_per_second(4, sampled=True)(8) == pytest.approx(1 / (0.043 + 0.004))
    step = rows.step_seconds(4, 8, sampled=True)
    assert rows.steps_per_second(4, sampled=True)(8) == pytest.approx(1 / step)
    assert not plausibility(rows.model_copy(update={"sampled_row_ms": -1.0})).ok
    # one draft token at 0.2: 1.2 tokens in 13 ms beats 1 in 11 ms; with 5 ms rows, 1.2 in 23 loses to 1 in 16
    confidences, shape = [np.array([0.2, 0.1])], StepShape(1, 1, 1, sampled=True)
    dear = profile.model_copy(update={"sampled_row_ms": 5.0})
    assert ScheduledVerification(profile, draft_gate=False).lengths(confidences, shape) == [1]
    assert ScheduledVerification(dear, draft_gate=False).lengths(confidences, shape) == [0]


def test_profile_curve_matches_interpolating_tokens_first():
    """The scheduler's fast curve (requests interpolated first, once per step) against the definition:
    interpolate each profiled request count's row over tokens, then across log(requests)."""
    rng = np.random.default_rng(0)
    requests, tokens, prefill = [1, 2, 4, 8, 16], [1, 2, 3, 5, 9], [32, 128]
    target = np.cumsum(np.cumsum(rng.uniform(1, 10, (5, 5)), axis=1), axis=0)
    profile = CostProfile(
        key="t", requests=requests, tokens_per_request=tokens, target_ms=target.tolist(),
        draft_ms=rng.uniform(1, 5, 5).tolist(), prefill_tokens=prefill, prefill_ms=[50.0, 150.0],
    )  # fmt: skip

    def reference_ms(n: int, b: int) -> float:
        x = b / n
        rows = [
            np.interp(x, tokens, row) if x <= tokens[-1]
            else row[-1] + (row[-1] - row[-2]) / (tokens[-1] - tokens[-2]) * (x - tokens[-1])
            for row in target
        ]  # fmt: skip
        if n >= requests[-1]:
            return rows[-1] * n / requests[-1]
        return float(np.interp(np.log(n), np.log(requests), rows))

    for n in (1, 3, 4, 11, 16, 40):
        for b in (n, n + 1, 2 * n + 1, 4 * n, 12 * n):
            for drafted, prefill_tokens in ((None, 0), (1, 64), (0, 300)):
                sps = profile.steps_per_second(n, drafted)(b)
                seconds = profile.step_seconds(n, b, drafted, prefill_tokens)
                draft = profile.draft_seconds(n if drafted is None else drafted)
                decoding = reference_ms(n, b) / 1000 + draft
                assert seconds == pytest.approx(decoding + profile.prefill_seconds(prefill_tokens), rel=1e-9)
                assert sps == pytest.approx(1 / decoding, rel=1e-9)  # the chunk's time is left out


def test_profile_is_measured_once_then_cached(default_model, tmp_path):
    proposer = NgramProposer()
    measured = load_or_measure(default_model, proposer, 2, 6, tmp_path)
    assert measured.tokens_per_request == [1, 1.25, 1.5, 2, 3, 4, 5, 6, 7]  # up to 1 + the longest draft
    assert measured.requests == [1, 2]
    assert all(ms > 0 for row in measured.target_ms for ms in row)
    # more tokens never cost much less (allowing timing noise), more requests cost more
    for row in measured.target_ms:
        assert row[-1] > row[0]
    assert measured.target_ms[1][-1] > measured.target_ms[0][-1]
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    cached = load_or_measure(default_model, proposer, 2, 6, tmp_path)
    assert cached == measured  # read back, not re-measured


def _fake_measurements(profiles: list[CostProfile]):
    """A measurement that times nothing: each attempt takes one 'run' and yields the next profile."""
    queue = iter(profiles)

    def measure():
        profile = next(queue)
        yield
        return profile

    return measure


GOOD = [[10.0, 11.0, 14.0], [20.0, 24.0, 40.0]]


def test_fractional_token_counts_are_measured_as_a_few_requests_verifying(default_model, monkeypatch):
    """1.25 tokens per request at 4 requests is 5 rows, one request taking 2: the shape of a loaded step
    where the scheduler verifies a token for one request. Counts no whole number of rows can take (1.5
    tokens for 1 request) are interpolated between their measured neighbours."""
    last_fed: list[int] = []
    fed: dict[tuple[int, float], list[int]] = {}
    forward = default_model.forward

    def recording(tokens, layout, cache, *args, **kwargs):
        last_fed[:] = layout.num_new
        return forward(tokens, layout, cache, *args, **kwargs)

    def rows_as_ms(runs, rounds=1):  # instead of timing: each shape "takes" 10 ms per row it fed
        for shape, run in runs.items():
            run()
            fed[shape] = list(last_fed)
            yield
        return {shape: 10.0 * sum(rows) for shape, rows in fed.items()}

    monkeypatch.setattr(default_model, "forward", recording)
    monkeypatch.setattr(cost_profile, "_interleaved_medians", rows_as_ms)
    gen = profile_target(default_model, [1, 2, 4], [1, 1.25, 1.5, 2, 3])
    with pytest.raises(StopIteration) as done:
        while True:
            next(gen)
    target_ms = done.value.value
    assert fed[4, 1.25] == [2, 1, 1, 1] and fed[4, 1.5] == [2, 2, 1, 1] and fed[2, 1.5] == [2, 1]
    assert (1, 1.5) not in fed and (2, 1.25) not in fed  # no whole number of rows: not a shape
    # 4 requests: 4, 5, 6, 8 and 12 rows, all measured
    assert target_ms[2] == [40.0, 50.0, 60.0, 80.0, 120.0]
    # 2 requests: 1.25 is 2.5 rows, interpolated between 2 (1 token) and 3 rows (1.5)
    assert target_ms[1] == [20.0, 25.0, 30.0, 40.0, 60.0]
    # 1 request: 1.25 and 1.5 lie on the line from 1 to 2 tokens
    assert target_ms[0] == [10.0, 12.5, 15.0, 20.0, 30.0]


def test_context_costs_are_measured_per_request_and_per_row(default_model, monkeypatch):
    """Forwards at the profile's context and a long one, for one row and the longest verification: a time
    per 1000 cached positions per request and per row, recovered from a machine whose forwards "take"
    10 ms + 2 ms a row + (4 ms + 0.8 ms a row) per 1000 cached positions."""
    fed: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    forward = default_model.forward
    last: list = []

    def recording(tokens, layout, cache, *args, **kwargs):
        last[:] = [list(layout.starts), list(layout.num_new)]
        return forward(tokens, layout, cache, *args, **kwargs)

    def modelled_ms(runs, rounds=1):
        for shape, run in runs.items():
            run()
            fed[shape] = tuple(last)
            yield
        return {(c, t): 10 + 2 * t + c / 1000 * (4 + 0.8 * t) for c, t in fed}

    monkeypatch.setattr(default_model, "forward", recording)
    monkeypatch.setattr(cost_profile, "_interleaved_medians", modelled_ms)
    gen = profile_context(default_model, 8)
    with pytest.raises(StopIteration) as done:
        while True:
            next(gen)
    assert done.value.value == (pytest.approx(4.0), pytest.approx(0.8))
    assert fed == {(c, t): ([c], [t]) for c in (PROFILE_CONTEXT, LONG_CONTEXT) for t in (1, 8)}


def test_steps_over_longer_contexts_cost_more_per_request_and_per_row():
    profile = _profile(GOOD).model_copy(update={"context_request_ms": 4.0, "context_row_ms": 0.8})
    base = profile.step_seconds(4, 8, drafted=0)
    assert profile.step_seconds(4, 8, drafted=0, cached=4 * PROFILE_CONTEXT) == pytest.approx(base)
    # 4 requests 1000 positions past the profile's context each, 8 rows: 4 x 4 + 8 x 0.8 ms more
    longer = profile.step_seconds(4, 8, drafted=0, cached=4 * (PROFILE_CONTEXT + 1000))
    assert longer == pytest.approx(base + (16 + 6.4) / 1000)
    assert profile.steps_per_second(4, 0, cached=4 * (PROFILE_CONTEXT + 1000))(8) == pytest.approx(1 / longer)
    # shorter contexts cost less, but never less than half the profile's forward
    assert profile.step_seconds(4, 8, drafted=0, cached=4 * (PROFILE_CONTEXT - 100)) < base
    steep = profile.model_copy(update={"context_request_ms": 40.0})  # 4 x 40 x 0.256 ms less at no context
    assert steep.step_seconds(4, 8, drafted=0, cached=0) == pytest.approx(base / 2)


def test_plausibility_allows_noise_and_rejects_shapes_that_cost_much_less():
    assert plausibility(_profile(GOOD)).ok
    noisy = _profile([[10.0, 9.0, 14.0], [20.0, 24.0, 40.0]])  # 10% below a smaller shape: noise
    assert plausibility(noisy).ok
    fewer_tokens_slower = _profile([[10.0, 11.0, 6.0], [20.0, 24.0, 40.0]])
    found = plausibility(fewer_tokens_slower)
    assert not found.ok and "1 requests x 5 tokens" in found.problems[0] and found.score > 0
    fewer_requests_slower = _profile([[30.0, 31.0, 34.0], [20.0, 24.0, 40.0]])
    assert not plausibility(fewer_requests_slower).ok
    assert not plausibility(_profile(GOOD, draft_ms=[5.0, 1.0])).ok  # 4 requests drafted in a fifth
    assert plausibility(_profile(GOOD, draft_ms=[0.02, 0.01])).ok  # sub-millisecond noise is allowed
    assert not plausibility(_profile([[10.0, float("nan"), 14.0], [20.0, 24.0, 40.0]])).ok
    # Against the profile a measurement replaces: more than 2x off is implausible, either way.
    twice = _profile([[v * 2.5 for v in row] for row in GOOD])
    assert plausibility(twice).ok and not plausibility(twice, reference=_profile(GOOD)).ok
    assert plausibility(_profile([[v * 1.5 for v in row] for row in GOOD]), reference=_profile(GOOD)).ok
    half = _profile([[v / 3 for v in row] for row in GOOD])
    assert not plausibility(half, reference=_profile(GOOD)).ok


def test_an_implausible_measurement_is_measured_again(tmp_path):
    bad, good = _profile([[10.0, 11.0, 4.0], [20.0, 24.0, 40.0]]), _profile(GOOD)
    path = tmp_path / "profile.json"
    measurement = ProfileMeasurement(None, None, 4, 4, path, "test", measure=_fake_measurements([bad, good]))
    assert measurement.run(progress=False) == good
    assert [p for p, _ in measurement.rejected] == [bad]
    assert measurement.total_runs == 2 * measurement.runs_per_attempt
    assert CostProfile.model_validate_json(path.read_text()) == good


def test_after_every_attempt_the_most_plausible_measurement_is_kept():
    worse = _profile([[10.0, 11.0, 2.0], [20.0, 24.0, 40.0]])
    bad = _profile([[10.0, 11.0, 6.0], [20.0, 24.0, 40.0]])
    measure = _fake_measurements([worse, bad, worse])
    measurement = ProfileMeasurement(None, None, 4, 4, None, "test", attempts=3, measure=measure)
    assert measurement.run(progress=False) == bad and len(measurement.rejected) == 3


def test_a_remeasurement_far_off_the_cached_profile_is_measured_again():
    reference = _profile(GOOD)
    spike = _profile([[v * 3 for v in row] for row in GOOD])  # a noisy neighbour during the whole run
    close = _profile([[v * 1.1 for v in row] for row in GOOD])
    measure = _fake_measurements([spike, close])
    measurement = ProfileMeasurement(None, None, 4, 4, None, "test", reference=reference, measure=measure)
    assert measurement.run(progress=False) == close


def test_cached_profiles_are_validated_on_load(default_model, tmp_path):
    proposer = NgramProposer()
    key = profile_key(default_model, 2, 4, proposer.name)
    path = tmp_path / f"{key}.json"
    grid = {"requests": [1, 2], "tokens_per_request": [1, 2, 3, 5], "draft_ms": [0.01, 0.02]}
    plausible = CostProfile(key=key, target_ms=[[20.0, 21.0, 22.0, 25.0], [30.0, 31.0, 33.0, 36.0]], **grid)

    def cached():
        return cached_or_measurement(default_model, proposer, 2, 4, tmp_path)

    path.write_text(plausible.model_dump_json())
    assert cached() == plausible
    remeasure = cached_or_measurement(default_model, proposer, 2, 4, tmp_path, remeasure=True)
    assert isinstance(remeasure, ProfileMeasurement) and remeasure.reference == plausible
    for broken in (
        plausible.model_copy(update={"target_ms": [[20.0, 21.0, 22.0, 5.0], [30.0, 31.0, 33.0, 36.0]]}),
        plausible.model_copy(update={"key": "elsewhere"}),
    ):
        path.write_text(broken.model_dump_json())
        found = cached()
        assert isinstance(found, ProfileMeasurement) and found.reference is None
    path.write_text('{"key": "')
    assert isinstance(cached(), ProfileMeasurement)


# ---- online acceptance estimator --------------------------------------------------------------------------


def test_estimator_learns_a_logistic_acceptance_curve():
    rng = np.random.default_rng(0)
    truth = [(-1.0, 0.6), (-0.5, 0.3)]  # per position: intercept, slope on the score
    estimator = OnlineAcceptanceEstimator(max_positions=2, prior_strength=1.0)
    for _ in range(6000):
        score = float(rng.integers(0, 6))
        accepted = 0
        for b, w in truth:
            if rng.random() < 1 / (1 + np.exp(-(b + w * score))):
                accepted += 1
            else:
                break
        estimator.update([score, score], 2, accepted, greedy=True)
    for score in (0.0, 2.0, 5.0):
        got = estimator.confidences([score, score], greedy=True)
        want = [1 / (1 + np.exp(-(b + w * score))) for b, w in truth]
        np.testing.assert_allclose(got, want, atol=0.05)
    # the sampled-mode model saw nothing: its prior 1/2, made optimistic (logit + optimism / sqrt(1 + 0))
    np.testing.assert_allclose(estimator.confidences([3.0], greedy=False), [1 / (1 + np.exp(-2.0))])
    assert OnlineAcceptanceEstimator(optimism=0.0).confidences([3.0], greedy=False) == pytest.approx([0.5])


def test_estimator_learns_only_from_reached_positions():
    estimator = OnlineAcceptanceEstimator(max_positions=3, refit_every=1)
    for _ in range(200):
        estimator.update([1.0, 1.0, 1.0], verified=3, accepted=0, greedy=True)  # position 0 always rejected
    conf = estimator.confidences([1.0, 1.0, 1.0], greedy=True)
    assert conf[0] < 0.05
    never_reached = 1 / (1 + np.exp(-estimator.optimism))  # the prior 1/2, optimistic: it gets verified
    assert conf[1] == pytest.approx(never_reached) and conf[2] == pytest.approx(never_reached)
    assert estimator.confidences([1.0] * 5, greedy=True)[3:].tolist() == [0.0, 0.0]  # past the models


def test_optimism_lets_the_scheduler_discover_good_later_positions():
    """A position is observed only when verified. With the prior alone, position 2 (truly 0.8) looked like
    1/2, the scheduler verified one token, and the estimate never moved; optimism while evidence is thin
    gets it verified, learnt, and then verified for the right reason."""
    truth = [0.4, 0.8, 0.8, 0.8]
    step_ms = [46.0, 47.0, 56.0, 57.5, 59.0]  # a measured batch-1 curve: 1..5 tokens

    def run(optimism: float) -> float:
        rng = np.random.default_rng(0)
        estimator = OnlineAcceptanceEstimator(max_positions=4, optimism=optimism)
        lengths = []
        for _ in range(1500):
            conf = estimator.confidences([[1.0]] * 4, greedy=True)
            (k,) = schedule_prefixes([conf], lambda b: 1000 / step_ms[b - 1], min_gain=0.02)
            accepted = 0
            while accepted < k and rng.random() < truth[accepted]:
                accepted += 1
            if k:
                estimator.update([[1.0]] * k, k, accepted, greedy=True)
            lengths.append(k)
        return float(np.mean(lengths[-500:]))

    assert run(optimism=0.0) < 1.5  # stuck: mostly one token
    assert run(optimism=2.0) > 3.5  # learnt that the whole draft pays


# ---- policies ---------------------------------------------------------------------------------------------


CONFIDENCES = [np.array([0.9, 0.8, 0.5]), np.array([0.4, 0.9]), np.array([])]


def test_fixed_and_threshold():
    shape = StepShape(3, 3, 3)
    fixed = build_policy(VerificationConfig(policy="fixed"), None)
    assert fixed.drafting(shape, 3, "ngram") == 3 and fixed.lengths(CONFIDENCES, shape) == [3, 2, 0]
    threshold = build_policy(VerificationConfig(policy="threshold", threshold=0.5), None)
    # survival: [0.9, 0.72, 0.36] and [0.4, 0.36]
    assert threshold.lengths(CONFIDENCES, shape) == [2, 0, 0]
    with pytest.raises(ValueError, match="cost profile"):
        build_policy(VerificationConfig(policy="scheduler"), None)


def test_scheduler_runs_algorithm_1_on_the_profile():
    profile = _profile([[10.0, 11.0, 30.0], [20.0, 40.0, 100.0]])
    policy = build_policy(VerificationConfig(policy="scheduler"), profile)
    shape = StepShape(num_requests=3, num_tokens=7, num_outputs=3)  # 4 prefill tokens ride along
    sps = profile.steps_per_second(3)
    expected = schedule_prefixes(CONFIDENCES, sps, base_tokens=7, base_outputs=3, min_gain=0.02)
    assert policy.lengths(CONFIDENCES, shape) == expected
    # an idle target (1 request) takes the cheap second token, a loaded one (4 requests) does not
    cheap = policy.lengths([np.array([0.6, 0.5])], StepShape(1, 1, 1))
    loaded = policy.lengths([np.array([0.6, 0.5])] * 4, StepShape(4, 4, 4))
    assert cheap[0] >= 1 and loaded == [0, 0, 0, 0]


def test_greedy_steps_reach_past_a_dear_row_to_cheap_ones():
    """A dear row, then a free one (the AVX-512 block kernel's passes of 4 rows make such steps): 3 tokens
    cost what 4 do. Verifying 2 drafts does not pay (1.75 tokens in 14 ms against 1.5 in 11), 3 do (1.975 in
    14 ms). A lone greedy request takes the best of the whole admission
    path; a sampling one stops at the first admission that does not pay (Appendix A), as do batched steps."""
    rows = [[10.0, 11.0, 14.0, 14.0], [20.0, 22.0, 28.0, 28.0]]
    paired = _profile(rows, requests=(1, 2), tokens=(1, 2, 3, 4))
    policy = ScheduledVerification(paired, draft_gate=False, min_gain=0.0)
    confidences = [np.array([0.5, 0.5, 0.9])]
    assert policy.lengths(confidences, StepShape(1, 1, 1)) == [3]
    assert policy.lengths(confidences, StepShape(1, 1, 1, sampled=True)) == [1]
    assert policy.lengths(confidences * 2, StepShape(2, 2, 2)) == [1, 1]


def test_a_prompt_chunk_riding_along_does_not_make_drafts_look_cheap():
    """A step carrying a 300-token prompt chunk pays for it whatever is drafted: the scheduler verifies what
    it would in the same step without the chunk (here nothing), where charging the chunk's time to the step
    would make every draft token look nearly free."""
    profile = _profile([[10.0, 11.0, 12.0], [40.0, 44.0, 48.0]], tokens=(1, 1.5, 2)).model_copy(
        update={"prefill_tokens": [32, 512], "prefill_ms": [30.0, 400.0]}
    )
    policy = ScheduledVerification(profile, draft_gate=False, min_gain=0.02)
    confidences = [np.array([0.2, 0.1])] * 4
    assert policy.lengths(confidences, StepShape(4, 4, 4)) == [0, 0, 0, 0]
    assert policy.lengths(confidences, StepShape(4, 4, 4, prefill_tokens=300)) == [0, 0, 0, 0]

    def charged(num_tokens: int) -> float:  # the whole step's rate, chunk included
        return 1 / profile.step_seconds(4, num_tokens, prefill_tokens=300)

    assert schedule_prefixes(confidences, charged, base_tokens=4, min_gain=0.02) != [0, 0, 0, 0]


def test_draft_gate_skips_drafting_that_cannot_pay_and_still_explores():
    costly_drafter = _profile([[10.0, 11.0, 14.0], [20.0, 40.0, 100.0]], draft_ms=[50.0, 200.0])
    policy = ScheduledVerification(costly_drafter, draft_gate=True, explore_every=4)
    shape = StepShape(1, 1, 1)
    assert policy.drafting(shape, 1, "dspark") == 1  # nothing known yet: draft
    policy.lengths([np.array([0.5, 0.5])], shape, ["dspark"])  # typical confidences are now known
    decisions = [policy.drafting(shape, 1, "dspark") for _ in range(4 + 8 + 16)]
    # 10 ms target + 50 ms draft never pays: a look after 4 gated steps, then after 8, then 16 (backing off)
    assert [i for i, d in enumerate(decisions) if d] == [3, 11, 27]
    assert sum(decisions) == 3
    free_drafter = ScheduledVerification(_profile([[10.0, 11.0, 14.0], [20.0, 40.0, 100.0]]))
    free_drafter.lengths([np.array([0.5, 0.5])], shape, ["dspark"])
    assert all(free_drafter.drafting(shape, 1, "dspark") == 1 for _ in range(8))


def test_draft_gate_judges_each_source_by_its_own_drafts_and_explores_with_one_request():
    """A hybrid's lookup drafts are often right and its model drafts rarely: mixing them would call the
    model when it cannot pay. Exploring a gated source costs one request's draft, not the batch's."""
    profile = _profile([[10.0, 11.0, 14.0], [20.0, 24.0, 30.0]], draft_ms=[4.0, 16.0])
    policy = ScheduledVerification(profile, draft_gate=True, explore_every=3)
    shape = StepShape(4, 4, 4)
    confident, doubtful = np.array([0.95, 0.9, 0.9]), np.array([0.2, 0.1, 0.1])
    policy.lengths([confident] * 3 + [doubtful], shape, ["ngram"] * 3 + ["dspark"])
    assert policy.drafting(shape, 4, "ngram") == 4
    assert [policy.drafting(shape, 4, "dspark") for _ in range(9)] == [0, 0, 1, 0, 0, 0, 0, 0, 1]
    mixed = ScheduledVerification(profile, draft_gate=True, explore_every=3)
    mixed.lengths([confident] * 3 + [doubtful], shape)  # one pool: the model would look worth its call
    assert mixed.drafting(shape, 4, "") == 4


def test_draft_gate_judges_a_source_by_its_drafts_not_their_mean():
    """Half the drafts near-certain, half hopeless: verifying the confident ones pays for the call, though the
    mean draft (every position ~0.5) would not."""
    profile = CostProfile(
        key="t", requests=[1, 4], tokens_per_request=[1, 2, 4],
        target_ms=[[10.0, 13.0, 16.0], [20.0, 30.0, 50.0]], draft_ms=[3.0, 12.0],
    )  # fmt: skip
    shape = StepShape(1, 1, 1)
    good, bad = np.array([0.95, 0.9, 0.9]), np.array([0.05, 0.05, 0.05])
    spread = ScheduledVerification(profile)
    spread.lengths([good, bad] * 4, shape, ["model"] * 8)
    assert spread.drafting(shape, 1, "model") == 1
    averaged = ScheduledVerification(profile)
    averaged.lengths([(good + bad) / 2] * 8, shape, ["model"] * 8)
    assert averaged.drafting(shape, 1, "model") == 0


def test_draft_gate_weighs_a_model_against_the_drafts_its_requests_already_hold():
    """A model whose drafts beat plain decoding, but not the free lookup drafts its requests already hold,
    is not worth its call; against no drafts (or hopeless ones) it is. Checked against the step's tokens/s
    computed by hand from the profile."""
    profile = CostProfile(
        key="t", requests=[1, 4], tokens_per_request=[1, 2, 4],
        target_ms=[[10.0, 12.0, 16.0], [20.0, 30.0, 50.0]], draft_ms=[4.0, 16.0],
    )  # fmt: skip
    shape = StepShape(1, 1, 1)
    model = np.array([0.8, 0.6, 0.5])
    # By hand: the scheduler verifies 2 tokens (survival 0.8, 0.48): 2.28 tokens in 4 + 14 ms = 127 tok/s
    # (1 token: 1.8 in 16 ms = 112), against 100 plain; lookup's 1 token at 0.9 verified for free: 1.9
    # tokens in 12 ms = 158 tok/s.
    assert schedule_prefixes([model], profile.steps_per_second(1, 1)) == [2]
    policy = ScheduledVerification(profile)
    policy.lengths([model] * 8, shape, ["model"] * 8)
    assert policy.drafting(shape, 1, "model") == 1  # against plain decoding: pays
    assert policy.drafting(shape, 1, "model", lambda: [np.array([0.05])]) == 1  # a hopeless lookup draft
    assert policy.drafting(shape, 1, "model", lambda: [np.array([0.9])]) == 0  # a good lookup draft wins


def test_a_source_that_cannot_beat_plain_decoding_never_weighs_the_fallback_drafts():
    """The fallback drafts are free, so they yield at least plain decoding: a model whose drafts cannot beat
    plain decoding is gated without computing their confidences (most steps under load)."""
    profile = CostProfile(
        key="t", requests=[1, 4], tokens_per_request=[1, 2, 4],
        target_ms=[[10.0, 12.0, 16.0], [20.0, 30.0, 50.0]], draft_ms=[4.0, 16.0],
    )  # fmt: skip
    asked = []

    def fallback() -> list[np.ndarray]:
        asked.append(True)
        return [np.array([0.9])]

    policy = ScheduledVerification(profile)
    shape = StepShape(1, 1, 1)
    policy.lengths([np.array([0.1, 0.05])] * 8, shape, ["model"] * 8)  # hopeless drafts
    assert policy.drafting(shape, 1, "model", fallback) == 0
    assert not asked
    policy.lengths([np.array([0.8, 0.6, 0.5])] * 64, shape, ["model"] * 64)  # drafts that beat plain
    assert policy.drafting(shape, 1, "model", fallback) == 0  # but not the lookup's draft at 0.9
    assert asked


@pytest.mark.parametrize(("draft_ms", "called"), [(5.4, 0), (4.0, 1)])
def test_a_draft_call_must_promise_more_than_a_thin_gain(draft_ms: float, called: int):
    """A draft model's call verifying one token at 0.8: 1.8 tokens in draft_ms + 12 ms against 1 in 10 without
    it. A 5.4 ms call promises +3.4%, past `min_gain` but inside DRAFT_CALL_MARGIN (at 8 clients such calls
    lost 4-9% in measured steps: 5.9 tokens accepted where the confidences promised 6.4 or more): gated. A
    4 ms call promises +12.5%: called."""
    profile = CostProfile(
        key="t", requests=[1, 4], tokens_per_request=[1, 2, 4],
        target_ms=[[10.0, 12.0, 16.0], [20.0, 30.0, 50.0]], draft_ms=[draft_ms, 4 * draft_ms],
    )  # fmt: skip
    shape, model = StepShape(1, 1, 1), np.array([0.8])
    gain = 1.8 / (draft_ms + 12) / (1 / 10) - 1
    assert 0.02 < gain < DRAFT_CALL_MARGIN if not called else gain > DRAFT_CALL_MARGIN
    policy = ScheduledVerification(profile, min_gain=0.02, measured_costs=False)
    policy.lengths([model] * 8, shape, ["model"] * 8)
    assert policy.drafting(shape, 1, "model") == called


def test_min_gain_refuses_thin_admissions():
    """A second token costing 11% more time and surviving with 0.12 gains 0.9% in expectation."""
    sps = {1: 1.0, 2: 1 / 1.11}.__getitem__  # the second token costs 11% more time
    assert schedule_prefixes([[0.12]], sps) == [1]  # 1.12 / 1.11 > 1: admitted by Algorithm 1
    assert schedule_prefixes([[0.12]], sps, min_gain=0.02) == [0]  # +0.9% < 2%: refused
    assert schedule_prefixes([[0.5]], sps, min_gain=0.02) == [1]


# ---- measured step costs ----------------------------------------------------------------------------------


def test_measured_costs_learn_each_kinds_ratio_and_clip_stalls():
    """Steps of one shape carry no slope: the fit is the plain ratio of measured to profiled time."""
    costs = MeasuredCosts()
    called, plain = (True, False), (False, False)
    for _ in range(COST_WARMUP - 1):
        costs.observe(called, predicted=0.010, measured=0.014)
    assert costs.fit(called) == CostFit()  # too few steps to steer by
    costs.observe(called, predicted=0.010, measured=0.014)
    assert costs.fit(called).scale == pytest.approx(1.4) and costs.fit(called).extra == pytest.approx(0)
    assert costs.fit(plain) == costs.fit(called)  # unmeasured: borrows the other kind's
    assert costs.fit((False, True)) == CostFit()  # nothing measured while sampling
    costs.observe(called, predicted=0.010, measured=10.0)  # a stall counts as twice the predicted time
    mean = 1.4 + (2.0 - 1.4) / (COST_WARMUP + 1)  # a running mean until the EMA takes over
    assert costs.fit(called).seconds(0.010) == pytest.approx(0.010 * mean)
    for _ in range(200):
        costs.observe(called, predicted=0.010, measured=0.016)
    assert costs.fit(called).seconds(0.010) == pytest.approx(0.016, rel=1e-3)  # it follows a drifting machine


def test_measured_costs_split_a_time_per_step_from_a_scale_on_the_profile():
    """Steps of several lengths: what they measure beyond the profile splits into a time per step and a
    scale, fitted by least squares against an independent fit (numpy's polyfit) of the same steps."""
    costs = MeasuredCosts()
    rng = np.random.default_rng(0)
    predicted = rng.uniform(0.010, 0.040, 400)
    measured = 1.1 * predicted + 0.003 + rng.normal(0, 0.0002, 400)
    for x, y in zip(predicted, measured, strict=True):
        costs.observe((False, False), x, y)
    fit = costs.fit((False, False))
    assert fit.scale == pytest.approx(1.1, abs=0.03) and fit.extra == pytest.approx(0.003, abs=0.0006)
    weights = np.zeros(400)  # each step's weight in the running mean, then the EMA
    for i in range(400):
        step = max(COST_SMOOTHING, 1 / (i + 1))
        weights = (1 - step) * weights
        weights[i] = step
    slope, intercept = np.polyfit(predicted, measured, 1, w=np.sqrt(weights))
    assert fit.scale == pytest.approx(slope, abs=0.02) and fit.extra == pytest.approx(intercept, abs=0.0005)


def test_a_kind_seen_few_times_leans_on_its_ratio():
    """The slope of a kind's fit carries the evidence of its steps: a dozen uneven steps move it only part of
    the way from the plain ratio, a few hundred of the same spread all but the whole way."""
    rng = np.random.default_rng(1)
    predicted = rng.uniform(0.020, 0.030, 300)
    measured = 1.5 * predicted - 0.005  # the ratio of the means is ~1.3
    few, many = MeasuredCosts(), MeasuredCosts()
    for i, (x, y) in enumerate(zip(predicted, measured, strict=True)):
        many.observe((False, False), x, y)
        if i < 12:
            few.observe((False, False), x, y)
    ratio = float(np.mean(measured[:12]) / np.mean(predicted[:12]))
    assert abs(few.fit((False, False)).scale - ratio) < 0.5 * abs(1.5 - ratio)
    assert many.fit((False, False)).scale == pytest.approx(1.5, abs=0.06)


def test_a_time_per_step_leaves_the_rows_their_profiled_price():
    """At one request a step measures the profile plus 3 ms of engine time, whatever its length. Fitted as
    a time per step, each row keeps its profiled price, so a longer verification spreads that time over more
    tokens: the scheduler verifies what it would with the 3 ms added to the profile. The plain ratio of the
    means (the older model) scales every length alike and so verified what the profile alone says."""
    profile = _profile([[10.0, 12.0, 15.0, 18.0], [20.0, 40.0, 80.0, 160.0]], tokens=(1, 2, 3, 4))
    shape = StepShape(1, 1, 1, drafted=0)
    confidences = [np.array([0.6, 0.6, 0.3])]  # survival 0.6, 0.36, 0.108
    policy = ScheduledVerification(profile, draft_gate=False, min_gain=0.0)
    for tokens in [1, 2, 3, 4] * 16:  # COST_PRIOR_STEPS steps: the slope has its full weight
        policy.observe(shape, tokens - 1, profile.step_seconds(1, tokens, drafted=0) + 0.003)
    fit = policy.costs.fit((False, False))
    # (the slope shrunk a little towards the ratio of the means, 1.22: these steps spread by ~22%)
    assert fit.scale == pytest.approx(1.0, abs=0.02) and fit.extra == pytest.approx(0.003, abs=4e-4)

    def added(num_tokens: int) -> float:
        return 1 / (profile.step_seconds(1, num_tokens, drafted=0) + 0.003)

    def ratio(num_tokens: int) -> float:  # 3 ms over a mean profiled 13.75 ms
        return 1 / (profile.step_seconds(1, num_tokens, drafted=0) * (1 + 3 / 13.75))

    assert policy.lengths(confidences, shape) == schedule_prefixes(confidences, added, base_tokens=1) == [2]
    assert schedule_prefixes(confidences, ratio, base_tokens=1) == [1]  # 1.96 / 15 ms < 1.6 / 12 ms


def test_a_measured_ratio_leaves_verification_lengths_to_the_profile():
    """Steps measured 25% dearer than profiled (longer contexts than the profile's) are dearer at every
    length: the scheduler verifies what the profile alone says. An added 25% of the base step, the same at
    every length, would make the rows look cheaper and verify more."""
    profile = _profile([[10.0, 11.0, 14.0], [40.0, 46.0, 64.0]], tokens=(1, 1.5, 2))
    shape = StepShape(4, 4, 4, drafted=0)
    confidences = [np.array([0.35, 0.2])] * 4  # one token: 4.35 in 43 ms against 4 in 40, +1.2% < 2%
    fresh = ScheduledVerification(profile, draft_gate=False, min_gain=0.02)
    measured = ScheduledVerification(profile, draft_gate=False, min_gain=0.02)
    for _ in range(COST_WARMUP):
        measured.observe(shape, 0, 1.25 * profile.step_seconds(4, 4, drafted=0))
    assert measured.costs.fit((False, False)) == CostFit(scale=pytest.approx(1.25), extra=pytest.approx(0))
    assert measured.lengths(confidences, shape) == fresh.lengths(confidences, shape) == [0, 0, 0, 0]

    def added(num_tokens: int) -> float:  # the old model: 10 ms more on every step
        return 1 / (profile.step_seconds(4, num_tokens, drafted=0) + 0.010)

    assert schedule_prefixes(confidences, added, base_tokens=4, min_gain=0.02) != [0, 0, 0, 0]


def test_draft_gate_weighs_a_draft_call_at_its_measured_cost():
    """By the profile a 2 ms draft call pays (1.9 tokens in 14 ms against 1 in 10); steps that call it measure
    10 ms dearer than the profile says, steps without it as profiled: the gate stops calling it. Measured
    alike, an extra cost on every step makes neither kind cheaper, and the call still pays."""
    profile = _profile([[10.0, 11.0, 14.0], [20.0, 40.0, 100.0]], draft_ms=[2.0, 8.0])
    confidences = [np.array([0.6, 0.5])]
    shape, called, plain = StepShape(1, 1, 1), StepShape(1, 1, 1, drafted=1), StepShape(1, 1, 1, drafted=0)

    def gate_after(measured_costs: bool, extra_called: float, extra_plain: float) -> list[int]:
        policy = ScheduledVerification(profile, explore_every=100, measured_costs=measured_costs)
        assert policy.lengths(confidences, called, ["dspark"]) == [2]
        for _ in range(COST_WARMUP):
            policy.observe(called, 2, profile.step_seconds(1, 3, drafted=1) + extra_called)
            policy.observe(plain, 0, profile.step_seconds(1, 1, drafted=0) + extra_plain)
        return [policy.drafting(shape, 1, "dspark") for _ in range(4)]

    assert gate_after(True, 0.0, 0.0) == [1] * 4
    assert gate_after(True, 0.010, 0.0) == [0] * 4
    assert gate_after(False, 0.010, 0.0) == [1] * 4  # the profile alone
    assert gate_after(True, 0.010, 0.010) == [1] * 4


def test_a_step_measured_cheaper_than_profiled_still_costs_half_its_profiled_time():
    """Steps that verify measure far cheaper than a too-dear profile says: the learnt (negative) extra lowers
    what the scheduler expects of such steps, down to half the profile's time, never to nothing or less."""
    profile = _profile([[10.0, 100.0, 400.0], [20.0, 400.0, 1600.0]])
    policy = ScheduledVerification(profile, draft_gate=False)
    shape = StepShape(4, 4, 4, drafted=0)
    for _ in range(COST_WARMUP):  # 4 requests verifying one token each: profiled 400 ms, measured 20
        policy.observe(shape, 4, 0.020)
    assert policy.costs.fit((False, False)).scale == pytest.approx(0.5)
    sps = policy._steps_per_second(shape)
    assert sps(4) == pytest.approx(1 / 0.010)  # a plain step, profiled 20 ms: half of it
    assert sps(8) == pytest.approx(1 / 0.200)  # the verifying step itself: 400 - 200 ms


def test_a_copied_profile_with_another_table_prices_by_its_own_table():
    """The forward curves are kept per request count; a copy with a new table must not read the old ones."""
    profile = CostProfile(
        key="t", requests=[1, 4], tokens_per_request=[1, 2], target_ms=[[10.0, 12.0], [20.0, 30.0]],
        draft_ms=[1, 2],
    )  # fmt: skip
    assert profile.target_seconds(2, 2) == pytest.approx(0.015)  # halfway in log n between 10 and 20
    dearer = profile.model_copy(update={"target_ms": [[20.0, 24.0], [40.0, 60.0]]})
    assert dearer.target_seconds(2, 2) == pytest.approx(0.030)
    assert profile.target_seconds(2, 2) == pytest.approx(0.015)
