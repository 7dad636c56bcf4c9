"""The hardware-aware prefix scheduler: optimality on unimodal cost curves, and the early stop that keeps
verification lossless (the paper's Appendix A counterexample, run through the real rejection sampler)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dspark.scheduling import prefix_survival, schedule_prefixes
from dspark.verify import verify

APPENDIX_SPS = {1: 1.0, 2: 0.5, 3: 0.45}
P_TARGET = torch.tensor([0.7, 0.3])
P_DRAFT = torch.tensor([0.5, 0.5])
CONTINUATION_CONFIDENCE = {0: 0.9, 1: 0.0}  # token A (0) makes position 2 look safe, B (1) hopeless


def _first_output_token(early_stop: bool, gen: torch.Generator) -> int:
    """One decoding round of the Appendix A setting; returns the first output token."""
    x1 = int(torch.multinomial(P_DRAFT, 1, generator=gen))
    x2 = int(torch.multinomial(P_DRAFT, 1, generator=gen))
    confidences = [[0.8, CONTINUATION_CONFIDENCE[x1]]]  # c_2 is computed from the drawn x1
    (length,) = schedule_prefixes(confidences, APPENDIX_SPS.__getitem__, early_stop)
    drafts = [x1, x2][:length]
    target_rows = P_TARGET.expand(length + 1, 2)
    result = verify(target_rows, torch.tensor(drafts, dtype=torch.long), [length],
                    P_DRAFT.expand(length, 2) if length else None, [False], [gen])  # fmt: skip
    return result.tokens[0][0]


@pytest.mark.parametrize("early_stop", [True, False])
def test_appendix_a_counterexample(early_stop: bool):
    gen = torch.Generator().manual_seed(0)
    n = 8000
    count_a = sum(_first_output_token(early_stop, gen) == 0 for _ in range(n))
    observed = [count_a, n - count_a]
    lossless = chisquare(observed, [0.7 * n, 0.3 * n]).pvalue
    biased = chisquare(observed, [0.85 * n, 0.15 * n]).pvalue
    if early_stop:
        assert lossless > 1e-3 and biased < 1e-12
    else:  # the retrospective search admits x1 only when it is A: (0.85, 0.15)
        assert lossless < 1e-12 and biased > 1e-3


def _throughput(lengths, confidences, sps) -> float:
    tokens = sum(1 + n for n in lengths)
    expected = sum(1 + prefix_survival(c)[:n].sum() for n, c in zip(lengths, confidences, strict=True))
    return expected * sps(tokens)


def test_optimal_against_brute_force_on_unimodal_curves():
    """Linear step time (SPS = 1 / (alpha + beta B)) makes tau * SPS unimodal along the admission path."""
    rng = random.Random(0)
    for _ in range(300):
        num_requests, gamma = rng.randint(1, 3), rng.randint(1, 4)
        confidences = [[rng.random() for _ in range(gamma)] for _ in range(num_requests)]
        alpha, beta = rng.uniform(0.1, 5), rng.uniform(0.01, 1)

        def sps(b, alpha=alpha, beta=beta):
            return 1 / (alpha + beta * b)

        chosen = schedule_prefixes(confidences, sps)
        best = max(
            _throughput(lengths, confidences, sps)
            for lengths in itertools.product(range(gamma + 1), repeat=num_requests)
        )
        assert _throughput(chosen, confidences, sps) == pytest.approx(best, rel=1e-12)


def test_light_load_verifies_everything_and_heavy_load_nothing():
    confidences = [[0.9, 0.8, 0.7]] * 2
    assert schedule_prefixes(confidences, lambda b: 1.0) == [3, 3]  # free tokens: verify all
    assert schedule_prefixes(confidences, lambda b: 1.0 / b) == [0, 0]  # cost linear in tokens: none pays
    assert schedule_prefixes([[1.0, 0.0, 0.5]], lambda b: 1.0) == [1]  # a dead prefix is never admitted


def test_prefix_survival_is_the_running_product():
    np.testing.assert_allclose(prefix_survival([0.5, 0.5, 0.8]), [0.5, 0.25, 0.2])
