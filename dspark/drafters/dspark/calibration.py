"""Sequential Temperature Scaling (paper Sec. 3.2.1) and the calibration error it minimises.

c_k is the probability that position k survives given the earlier ones did, so the prefix survival is
prod_{i<=k} c_i. STS fits one temperature per position, left to right: position k's temperature minimises
the ECE of the calibrated prefix product, with positions < k already fixed. Temperature scaling keeps the
ranking of confidences. Greedy and sampled verification accept differently (argmax match vs 1 - TV), so
each gets its own scaling. The confidence head learns 1 - TV, which is not the greedy acceptance rate: a
temperature alone cannot move a systematically shifted estimate, so each position may also get an offset
(Platt scaling, sigmoid(l / T + b)), which still preserves the ranking.

Two objectives fit a position's scaling: the paper's (`ece`), the grid point of least ECE of the prefix
product, and `log_loss`, the maximum-likelihood Platt fit of the conditional survival on the blocks whose
earlier positions survived (for sampled verification, weighted by the probability that they did), a proper
scoring rule and smooth in (T, b). Which generalises better depends on the drafter and the held-out set, so
training picks by ECE cross-fitted over folds of sequences (`cross_fitted_ece`): one fit/test split of ~20k
blocks is too noisy to choose by (v5's first fit looked 0.6 points worse than raw at position 1 on one split).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel

TEMPERATURE_GRID = torch.exp(torch.linspace(-2.5, 2.5, 101)).double()  # 0.08 .. 12, log-spaced
OFFSET_GRID = torch.linspace(-3, 3, 61).double()


class PositionScaling(BaseModel):
    temperature: float = 1.0
    offset: float = 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits / self.temperature + self.offset)


class Calibration(BaseModel):
    greedy: list[PositionScaling]  # one per draft position
    sampled: list[PositionScaling]
    # One scaling shared by every position: what a format without per-position calibration (vLLM's) can
    # carry, folded into the confidence head's weights on export.
    greedy_shared: PositionScaling | None = None
    sampled_shared: PositionScaling | None = None

    def scalings(self, greedy: bool) -> list[PositionScaling]:
        return self.greedy if greedy else self.sampled


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 15) -> float:
    """Equal-width-bin ECE: sum over bins of |mean outcome - mean prob| weighted by the bin's share."""
    return float(_ece_rows(probs.flatten()[None], outcomes.flatten(), bins)[0])


def _ece_rows(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 15) -> torch.Tensor:
    """ECE of every row of probs [candidates, n] against the same outcomes [n], in one pass."""
    probs, outcomes = probs.double(), outcomes.double()
    candidates, n = probs.shape
    index = (probs * bins).long().clamp(0, bins - 1) + bins * torch.arange(candidates)[:, None]
    gap = torch.bincount(index.flatten(), (probs - outcomes).flatten(), minlength=candidates * bins)
    return gap.view(candidates, bins).abs().sum(1) / max(n, 1)


def fit_sts(
    logits: torch.Tensor,
    survived: torch.Tensor,
    valid: torch.Tensor,
    with_offset: bool = True,
    objective: Literal["log_loss", "ece"] = "log_loss",
) -> list[PositionScaling]:
    """Per-position scalings for confidence logits [blocks, gamma]: by `ece`, left to right (position k's
    grid point given the scalings already fitted before it); by `log_loss`, each position on the blocks that
    reached it with their earlier positions surviving.

    survived[b, k]: did position k survive given positions < k did (0/1, or a probability for sampled
    verification); valid[b, k]: the block reaches position k. The prefix outcome multiplies `survived`
    along the block, matching the prefix product of the confidences.
    """
    if objective == "log_loss":
        reached = _reached(survived) * valid.double()
        return [
            _platt(logits[:, k], survived[:, k], reached[:, k], with_offset) if reached[:, k].sum() > 0
            else PositionScaling()  # no held-out block reaches this position
            for k in range(logits.shape[1])
        ]  # fmt: skip
    prefix_outcome = torch.cumprod(survived.double(), dim=1)
    prefix_prob = torch.ones(logits.shape[0], dtype=torch.float64)
    offsets = OFFSET_GRID if with_offset else torch.zeros(1, dtype=torch.float64)
    scalings = []
    for k in range(logits.shape[1]):
        rows = valid[:, k].bool()
        if not rows.any():  # no held-out block reaches this position
            scalings.append(PositionScaling())
            continue
        outcome, prefix, row_logits = prefix_outcome[rows, k], prefix_prob[rows], logits[rows, k].double()
        grid = [(t, b) for t in TEMPERATURE_GRID.tolist() for b in offsets.tolist()]
        temps = torch.tensor([t for t, _ in grid], dtype=torch.float64)[:, None]
        shifts = torch.tensor([b for _, b in grid], dtype=torch.float64)[:, None]
        errors = _ece_rows(prefix * torch.sigmoid(row_logits / temps + shifts), outcome)
        t, b = grid[int(errors.argmin())]
        best = PositionScaling(temperature=t, offset=b)
        scalings.append(best)
        prefix_prob = prefix_prob * best.apply(logits[:, k].double())
    return scalings


def _reached(survived: torch.Tensor) -> torch.Tensor:
    """[blocks, gamma]: did (or, soft, how likely did) every position before k survive."""
    before = torch.cat((torch.ones_like(survived[:, :1]), survived[:, :-1]), 1).double()
    return torch.cumprod(before, 1)


def fit_shared(logits: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor) -> PositionScaling:
    """One Platt scaling sigmoid(l / T + b) for all positions, fitted by log-loss on the conditional survival
    of every position whose prefix survived (the single affine correction a confidence head can absorb)."""
    weight = _reached(survived) * valid.double()
    return _platt(logits.flatten(), survived.flatten(), weight.flatten(), with_offset=True)


def _platt(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, with_offset: bool) -> PositionScaling:
    """(T, b) of least weighted log-loss of sigmoid(x / T + b) against outcomes y (b = 0 without offset)."""
    x, y, weight = x.double(), y.double(), weight.double()
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # log(1 / T), b
    optimizer = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        z = x * params[0].exp() + (params[1] if with_offset else 0.0)
        value = (torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none") * weight).sum()
        value = value / weight.sum().clamp_min(1)
        value.backward()
        return value

    optimizer.step(loss)
    log_inverse, offset = params.detach().tolist()
    return PositionScaling(temperature=math.exp(-log_inverse), offset=offset if with_offset else 0.0)


def prefix_probabilities(logits: torch.Tensor, scalings: list[PositionScaling] | None = None) -> torch.Tensor:
    """[blocks, gamma] calibrated prefix survival probabilities (scalings None: raw confidences)."""
    scalings = scalings or [PositionScaling()] * logits.shape[1]
    conf = torch.stack([s.apply(logits[:, k].double()) for k, s in enumerate(scalings)], dim=1)
    return torch.cumprod(conf, dim=1)


def _ece_by_position(probs: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor) -> list[float]:
    outcomes, valid = torch.cumprod(survived.double(), dim=1), valid.bool()
    return [
        expected_calibration_error(probs[valid[:, k], k], outcomes[valid[:, k], k])
        for k in range(probs.shape[1])
    ]


def prefix_ece(
    logits: torch.Tensor,
    survived: torch.Tensor,
    valid: torch.Tensor,
    scalings: list[PositionScaling] | None = None,
) -> list[float]:
    """ECE of the prefix survival probability at every position (scalings None: raw confidences)."""
    return _ece_by_position(prefix_probabilities(logits, scalings), survived, valid)


Fold = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logits, survived, valid) of some sequences' blocks


Fit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[PositionScaling]]


def cross_fitted_ece(folds: list[Fold], fit: Fit) -> list[float]:
    """Per-position ECE of the prefix survival over the blocks of every fold, each fold's probabilities from
    scalings fitted on the other folds: no block is scored by a fit that saw its sequence, and all blocks
    count (one fit/test split leaves half as many, and an ECE over fewer blocks reads higher from noise)."""
    probs = []
    for i, (logits, _, _) in enumerate(folds):
        rest = [fold for j, fold in enumerate(folds) if j != i]
        probs.append(
            prefix_probabilities(logits, fit(*(torch.cat(parts) for parts in zip(*rest, strict=True))))
        )
    survived, valid = torch.cat([f[1] for f in folds]), torch.cat([f[2] for f in folds])
    return _ece_by_position(torch.cat(probs), survived, valid)
