"""Online acceptance estimation for proposers without a confidence head (n-gram, independent draft models).

Position j of a draft gets c_j = sigmoid(b_j + w_j * s_j), where s_j is a draft-side score known before
verification (an n-gram draft's match length, a draft model's top-probability log-odds) and the pair
(b_j, w_j) is a per-position logistic model refit online from verified outcomes: a position that was
reached (every earlier one accepted) counts as accepted or rejected; positions after a rejection carry no
information. Greedy and sampled requests accept differently, so each has its own models.

The scores never depend on the draft token being judged, only on the context before it, so admitting a
token on these confidences keeps verification lossless (paper Appendix A).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class _PositionModel:
    """Logistic regression of one draft position on one score, on a sliding window of outcomes."""

    def __init__(self, prior: np.ndarray, prior_strength: float, window: int) -> None:
        self.prior = prior
        self.weights = prior.copy()
        self.prior_strength = prior_strength
        self.scores = np.zeros(window)
        self.outcomes = np.zeros(window)
        self.count = 0  # outcomes seen in total; the window holds the last `window`

    def add(self, score: float, accepted: bool) -> None:
        i = self.count % len(self.scores)
        self.scores[i], self.outcomes[i] = score, float(accepted)
        self.count += 1

    def refit(self, iterations: int = 8) -> None:
        """Newton's method on the L2-regularised (toward the prior) log-likelihood: 2 parameters."""
        n = min(self.count, len(self.scores))
        x = np.stack([np.ones(n), self.scores[:n]], axis=1)
        y = self.outcomes[:n]
        w = self.weights
        for _ in range(iterations):
            p = _sigmoid(x @ w)
            grad = x.T @ (p - y) + self.prior_strength * (w - self.prior)
            hessian = (x.T * (p * (1 - p))) @ x + self.prior_strength * np.eye(2)
            w = w - np.linalg.solve(hessian, grad)
        self.weights = w

    def predict(self, scores: np.ndarray) -> np.ndarray:
        return _sigmoid(self.weights[0] + self.weights[1] * scores)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


class OnlineAcceptanceEstimator:
    """Per-position acceptance models, refit every `refit_every` new outcomes of a mode."""

    def __init__(
        self,
        max_positions: int = 16,
        prior_acceptance: float = 0.5,
        prior_strength: float = 4.0,
        window: int = 4096,
        refit_every: int = 64,
    ) -> None:
        if not 0 < prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must lie in (0, 1), got {prior_acceptance}")
        prior = np.array([math.log(prior_acceptance / (1 - prior_acceptance)), 0.0])
        self.models = {
            greedy: [_PositionModel(prior, prior_strength, window) for _ in range(max_positions)]
            for greedy in (True, False)
        }
        self.refit_every = refit_every
        self._since_refit = {True: 0, False: 0}

    def confidences(self, scores: Sequence[float], greedy: bool) -> np.ndarray:
        """P(position j survives | positions < j survived) for a draft with these per-position scores."""
        models = self.models[greedy]
        values = np.asarray(scores, dtype=np.float64)
        out = np.zeros(len(values))
        for j in range(min(len(values), len(models))):  # positions past the last model: confidence 0
            out[j] = models[j].predict(values[j : j + 1])[0]
        return out

    def update(self, scores: Sequence[float], verified: int, accepted: int, greedy: bool) -> None:
        """Record one verification: `verified` positions were checked, the first `accepted` survived."""
        models = self.models[greedy]
        reached = min(verified, accepted + 1, len(models))
        for j in range(reached):
            models[j].add(float(scores[j]), j < accepted)
        self._since_refit[greedy] += reached
        if self._since_refit[greedy] >= self.refit_every:
            self._since_refit[greedy] = 0
            for model in models:
                if model.count:
                    model.refit()
