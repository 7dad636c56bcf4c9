"""Online acceptance estimation for proposers without a confidence head (n-gram, independent draft models).

Position j of a draft gets c_j = sigmoid(b_j + w_j . f_j), where f_j are features known before
verification (an n-gram draft's match length, a draft model's top-probability log-odds, the request's
acceptance so far) and (b_j, w_j) is a per-position logistic model refit online from verified outcomes: a
position that was reached (every earlier one accepted) counts as accepted or rejected; positions after a
rejection carry no information. Greedy and sampled requests accept differently, so each has its own models.

The features never depend on the draft token being judged, only on the context before it, so admitting a
token on these confidences keeps verification lossless (paper Appendix A).

A position is only observed when the scheduler verifies it, so a position whose estimate starts low would
never be verified and never corrected (seen: n-gram position 2 stayed at its prior 1/2 against a true 0.72,
and the scheduler verified one token in 87% of steps). Confidences are therefore optimistic while a position
has few outcomes: its logit gets a bonus of `optimism / sqrt(1 + outcomes)`, which vanishes as evidence
accumulates (the optimism-under-uncertainty rule of bandit algorithms). The bonus depends on counts only,
never on a draft token, so losslessness is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class _PositionModel:
    """Logistic regression of one draft position on its features, on a sliding window of outcomes."""

    def __init__(self, prior_logit: float, num_features: int, prior_strength: float, window: int) -> None:
        self.prior = np.zeros(num_features + 1)
        self.prior[0] = prior_logit
        self.weights = self.prior.copy()
        self.prior_strength = prior_strength
        self.inputs = np.zeros((window, num_features + 1))
        self.inputs[:, 0] = 1.0  # the intercept's constant input
        self.outcomes = np.zeros(window)
        self.count = 0  # outcomes seen in total; the window holds the last `window`

    def add(self, features: np.ndarray, accepted: bool) -> None:
        i = self.count % len(self.outcomes)
        self.inputs[i, 1:], self.outcomes[i] = features, float(accepted)
        self.count += 1

    def refit(self, iterations: int = 8) -> None:
        """Newton's method on the L2-regularised (toward the prior) log-likelihood."""
        n = min(self.count, len(self.outcomes))
        x, y, w = self.inputs[:n], self.outcomes[:n], self.weights
        ridge = self.prior_strength * np.eye(len(w))
        for _ in range(iterations):
            p = _sigmoid(x @ w)
            grad = x.T @ (p - y) + self.prior_strength * (w - self.prior)
            hessian = (x.T * (p * (1 - p))) @ x + ridge
            w = w - np.linalg.solve(hessian, grad)
        self.weights = w

    def predict(self, features: np.ndarray) -> float:
        return float(_sigmoid(self.weights[0] + features @ self.weights[1:]))

    @property
    def evidence(self) -> int:
        """Outcomes the current fit rests on."""
        return min(self.count, len(self.outcomes))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


class OnlineAcceptanceEstimator:
    """Per-position acceptance models, refit every `refit_every` new outcomes of a mode."""

    def __init__(
        self,
        max_positions: int = 16,
        num_features: int = 1,
        prior_acceptance: float = 0.5,
        prior_strength: float = 4.0,
        window: int = 4096,
        refit_every: int = 64,
        optimism: float = 2.0,
    ) -> None:
        if not 0 < prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must lie in (0, 1), got {prior_acceptance}")
        prior = math.log(prior_acceptance / (1 - prior_acceptance))
        self.num_features = num_features
        self.optimism = optimism

        def position_models() -> list[_PositionModel]:
            return [_PositionModel(prior, num_features, prior_strength, window) for _ in range(max_positions)]

        self.models = {True: position_models(), False: position_models()}
        self.refit_every = refit_every
        self._since_refit = {True: 0, False: 0}

    def confidences(self, features: Sequence[Sequence[float]], greedy: bool) -> np.ndarray:
        """P(position j survives | positions < j survived) for a draft with these per-position features
        (one row of `num_features` values per draft position)."""
        return self.confidences_many([features], [greedy])[0]

    def confidences_many(
        self, drafts: Sequence[Sequence[Sequence[float]]], greedy: Sequence[bool]
    ) -> list[np.ndarray]:
        """`confidences` for a whole step's drafts in a few array operations (it runs every step)."""
        rows = [self._rows(f) for f in drafts]
        out = [np.zeros(len(r)) for r in rows]  # positions past the last model: confidence 0
        for mode in (True, False):
            chosen = [i for i, g in enumerate(greedy) if g == mode and len(rows[i])]
            if not chosen:
                continue
            weights = np.stack([m.weights for m in self.models[mode]])  # [positions, 1 + features]
            bonus = self.optimism / np.sqrt(1.0 + np.array([m.evidence for m in self.models[mode]]))
            positions = np.concatenate([np.arange(len(rows[i])) for i in chosen])
            stacked = np.concatenate([rows[i] for i in chosen])
            modelled = positions < len(weights)
            index = np.minimum(positions, len(weights) - 1)
            w = weights[index]
            logits = w[:, 0] + (w[:, 1:] * stacked).sum(1) + bonus[index]
            values = _sigmoid(logits) * modelled
            for i, part in zip(
                chosen, np.split(values, np.cumsum([len(rows[i]) for i in chosen])[:-1]), strict=True
            ):
                out[i] = part
        return out

    def update(self, features: Sequence[Sequence[float]], verified: int, accepted: int, greedy: bool) -> None:
        """Record one verification: `verified` positions were checked, the first `accepted` survived."""
        rows = self._rows(features)
        models = self.models[greedy]
        reached = min(verified, accepted + 1, len(models))
        for j in range(reached):
            models[j].add(rows[j], j < accepted)
        self._since_refit[greedy] += reached
        if self._since_refit[greedy] >= self.refit_every:
            self._since_refit[greedy] = 0
            for model in models:
                if model.count:
                    model.refit()

    def _rows(self, features: Sequence[Sequence[float]]) -> np.ndarray:
        rows = np.asarray(features, dtype=np.float64).reshape(len(features), -1 if len(features) else 0)
        if len(rows) and rows.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features per position, got {rows.shape[1]}")
        return rows
