"""Goodness of fit of sampled output against exact transformers probabilities (shared by engine tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.stats import chisquare


def first_two_token_probs(hf_model, prompt: Sequence[int], num_first: int = 4):
    """Exact p(t1) over the vocabulary, and p(t2 | t1) for the `num_first` most likely t1 (fp64 softmax)."""
    with torch.no_grad():
        p1 = torch.softmax(hf_model(torch.tensor([list(prompt)])).logits[0, -1].double(), -1)
        p2 = {
            t1: torch.softmax(hf_model(torch.tensor([[*prompt, t1]])).logits[0, -1].double(), -1)
            for t1 in p1.topk(num_first).indices.tolist()
        }
    return p1, p2


def first_two_token_pvalue(completions: Sequence[tuple[int, int]], p1, p2) -> float:
    """Chi-square p-value of observed (t1, t2) pairs: a cell per likely pair (>= 5 expected), one for rest."""
    n = len(completions)
    cells = [
        (t1, t2, float(p1[t1] * dist[t2])) for t1, dist in p2.items() for t2 in dist.topk(3).indices.tolist()
    ]
    kept = [(t1, t2, p) for t1, t2, p in cells if p * n >= 5]
    assert len(kept) >= 3, "too few cells for a meaningful test"
    observed = [sum(c == (t1, t2) for c in completions) for t1, t2, _ in kept]
    expected = [p * n for *_, p in kept]
    return float(chisquare([*observed, n - sum(observed)], [*expected, n - sum(expected)]).pvalue)
