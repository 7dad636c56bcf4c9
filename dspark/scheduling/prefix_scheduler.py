"""The hardware-aware prefix scheduler (paper Algorithm 1): how many draft tokens each request verifies.

Prefix survival a_{r,j} = prod_{i<=j} c_{r,i} is non-increasing in j, so admitting draft tokens in global
descending order of a_{r,j} respects every request's prefix structure. Each admission adds one token to
the step (B += 1) and a_{r,j} to the expected accepted tokens tau; the scheduler keeps admitting while the
expected throughput tau * SPS(B) improves and stops at the first non-improvement. That early stop is what
keeps verification lossless: admitting x_{r,k} never depends on confidences computed from x_{r,k} itself
(paper Appendix A). It is also optimal when tau * SPS(B) is unimodal along the admission path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def prefix_survival(confidences: Sequence[float]) -> np.ndarray:
    return np.cumprod(np.asarray(confidences, dtype=np.float64))


def expected_accepted(confidences: Sequence[Sequence[float]], lengths: Sequence[int]) -> float:
    """Expected accepted draft tokens when request r verifies its first lengths[r] tokens."""
    return float(sum(prefix_survival(c[:k]).sum() for c, k in zip(confidences, lengths, strict=True) if k))


def schedule_prefixes(
    confidences: Sequence[Sequence[float]],
    steps_per_second: Callable[[int], float],
    early_stop: bool = True,
    base_tokens: int | None = None,
    base_outputs: int | None = None,
    min_gain: float = 0.0,
) -> list[int]:
    """Verification length per request (0 allowed) maximising expected tokens/s.

    confidences[r][j]: P(draft position j of request r survives | positions < j survived).
    steps_per_second(B): profiled steps/s for a step of B tokens.
    base_tokens: tokens the step feeds before any draft (default: one per request; prefill chunks add more).
    base_outputs: tokens the step yields without drafts (default: one per request, its bonus token).
    min_gain: an admission must raise expected tokens/s by this fraction (0: Algorithm 1 as published); a
    hedge against error in the cost profile and the confidences, which matters where gains are thin.
    early_stop=False is the retrospective global search the paper shows to be biased; kept for tests.
    """
    num_requests = len(confidences)
    candidates = [
        (a, r, j + 1)
        for r, conf in enumerate(confidences)
        for j, a in enumerate(prefix_survival(conf))
        if a > 0
    ]
    candidates.sort(key=lambda c: -c[0])  # stable: ties keep request order, then position order
    lengths = [0] * num_requests
    best_lengths = list(lengths)
    tokens = num_requests if base_tokens is None else base_tokens
    expected = float(num_requests if base_outputs is None else base_outputs)
    best = expected * steps_per_second(tokens)
    for survival, r, j in candidates:
        lengths[r] = j
        tokens += 1
        expected += survival
        throughput = expected * steps_per_second(tokens)
        if throughput > best * (1 + min_gain):
            best, best_lengths = throughput, list(lengths)
        elif early_stop:
            break
    return best_lengths
