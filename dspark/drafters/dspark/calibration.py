"""Sequential Temperature Scaling (paper Sec. 3.2.1) and the calibration error it minimises.

c_k is the probability that position k survives given the earlier ones did, so the prefix survival is
prod_{i<=k} c_i. STS fits one temperature per position, left to right: position k's temperature minimises
the ECE of the calibrated prefix product, with positions < k already fixed. Temperature scaling keeps the
ranking of confidences. Greedy and sampled verification accept differently (argmax match vs 1 - TV), so
each gets its own temperatures.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

TEMPERATURE_GRID = torch.exp(torch.linspace(-2.5, 2.5, 201))  # 0.08 .. 12, log-spaced


class Calibration(BaseModel):
    greedy: list[float]  # per-position temperatures
    sampled: list[float]

    def temperatures(self, greedy: bool) -> list[float]:
        return self.greedy if greedy else self.sampled


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 15) -> float:
    """Equal-width-bin ECE: sum over bins of |mean outcome - mean prob| weighted by the bin's share."""
    probs, outcomes = probs.flatten().double(), outcomes.flatten().double()
    index = (probs * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, probs - outcomes, minlength=bins).abs()
    return float(gap.sum() / counts.sum().clamp_min(1))


def scale(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits / temperatures)


def fit_sts(logits: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Per-position temperatures for confidence logits [blocks, gamma].

    survived[b, k]: did position k survive given positions < k did (0/1, or a probability for sampled
    verification); valid[b, k]: the block reaches position k. The prefix outcome multiplies `survived`
    along the block, matching the prefix product of the confidences.
    """
    gamma = logits.shape[1]
    prefix_outcome = torch.cumprod(survived.double(), dim=1)
    prefix_prob = torch.ones(logits.shape[0], dtype=torch.float64)
    temperatures = []
    for k in range(gamma):
        rows = valid[:, k].bool()
        if not rows.any():
            temperatures.append(1.0)
            continue
        errors = [
            expected_calibration_error(
                prefix_prob[rows] * scale(logits[rows, k].double(), t), prefix_outcome[rows, k]
            )
            for t in TEMPERATURE_GRID.double()
        ]
        best = float(TEMPERATURE_GRID[int(torch.tensor(errors).argmin())])
        temperatures.append(best)
        prefix_prob = prefix_prob * scale(logits[:, k].double(), torch.tensor(best, dtype=torch.float64))
    return temperatures


def prefix_ece(
    logits: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor, temperatures: list[float] | None = None
) -> list[float]:
    """ECE of the prefix survival probability at every position (temperatures None: raw confidences)."""
    t = torch.tensor(temperatures or [1.0] * logits.shape[1], dtype=torch.float64)
    prefix_prob = torch.cumprod(scale(logits.double(), t), dim=1)
    prefix_outcome = torch.cumprod(survived.double(), dim=1)
    return [
        expected_calibration_error(prefix_prob[valid[:, k].bool(), k], prefix_outcome[valid[:, k].bool(), k])
        for k in range(logits.shape[1])
    ]
