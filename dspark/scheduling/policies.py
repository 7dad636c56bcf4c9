"""Verification policies: how many of each request's draft tokens the target verifies this step.

One engine, one code path: the engine asks the policy whether to draft at all, then hands it every
drafting request's per-position confidences and verifies exactly the prefixes it returns. (Speculation
itself is switched off in one place only: the engine's proposer `none`.)
- `fixed`: verify the whole draft (up to gamma), the classic speculative decoding.
- `threshold`: verify the prefix whose survival probability stays above a static threshold.
- `scheduler`: the hardware-aware prefix scheduler (Algorithm 1) on the profiled cost curve; it also skips
  drafting when even typical drafts could not pay for themselves at this batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dspark.scheduling.cost_profile import CostProfile
from dspark.scheduling.prefix_scheduler import expected_accepted, prefix_survival, schedule_prefixes

PolicyName = Literal["fixed", "threshold", "scheduler"]


class VerificationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = Field("scheduler", description="fixed | threshold | scheduler (hardware-aware)")
    threshold: float = Field(0.3, gt=0, lt=1, description="prefix survival cut-off of policy 'threshold'")
    draft_gate: bool = Field(True, description="scheduler: skip drafting when it cannot pay off")
    explore_every: int = Field(16, ge=1, description="scheduler: draft at least every n-th gated step")
    min_gain: float = Field(
        0.02, ge=0, lt=1, description="scheduler: least relative gain in expected tokens/s per admitted token"
    )
    profile_cache: bool = Field(True, description="cache the cost profile per machine and model")


@dataclass
class StepShape:
    """The step before any draft token: its decoding requests and their tokens, the tokens it yields anyway
    (one per request whose pending tokens it completes), and the prompt-chunk tokens riding along."""

    num_requests: int
    num_tokens: int
    num_outputs: int
    prefill_tokens: int = 0


class VerificationPolicy(Protocol):
    name: str

    def wants_drafts(self, shape: StepShape, num_drafting: int) -> bool: ...

    def lengths(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        """Verification length for each drafting request (at most its draft length)."""
        ...


class FixedLength:
    name = "fixed"

    def wants_drafts(self, shape: StepShape, num_drafting: int) -> bool:
        return True

    def lengths(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        return [len(c) for c in confidences]


class ConfidenceThreshold:
    name = "threshold"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def wants_drafts(self, shape: StepShape, num_drafting: int) -> bool:
        return True

    def lengths(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        # Prefix survival is non-increasing, so the positions above the threshold form a prefix.
        return [int((prefix_survival(c) >= self.threshold).sum()) for c in confidences]


class ScheduledVerification:
    """Algorithm 1 on the cost profile, with a draft gate fed by the running mean confidences.

    Until it has a profile (a first start measures it while the server is idle), it verifies whole drafts,
    as `fixed` does."""

    name = "scheduler"

    def __init__(
        self,
        profile: CostProfile | None,
        draft_gate: bool = True,
        explore_every: int = 16,
        min_gain: float = 0.0,
    ) -> None:
        self.profile = profile
        self.min_gain = min_gain
        self.draft_gate = draft_gate
        self.explore_every = explore_every
        self.typical = np.zeros(0)  # running mean confidence per position
        self._seen = np.zeros(0)
        self._gated = 0  # consecutive steps the gate skipped

    def wants_drafts(self, shape: StepShape, num_drafting: int) -> bool:
        if self.profile is None or not self.draft_gate or not self.typical.size or not num_drafting:
            return True
        if self._pays_off(shape, num_drafting) or self._gated + 1 >= self.explore_every:
            self._gated = 0
            return True
        self._gated += 1
        return False

    def lengths(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        self._observe(confidences)
        if self.profile is None:
            return [len(c) for c in confidences]
        return self._schedule(confidences, shape)

    def _schedule(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        sps = self.profile.steps_per_second(shape.num_requests, prefill_tokens=shape.prefill_tokens)
        return schedule_prefixes(
            confidences, sps, base_tokens=shape.num_tokens, base_outputs=shape.num_outputs,
            min_gain=self.min_gain,
        )  # fmt: skip

    def _pays_off(self, shape: StepShape, num_drafting: int) -> bool:
        """Would typical drafts raise expected tokens/s above not drafting (no draft time, no drafts)?"""
        typical = [self.typical] * num_drafting
        lengths = self._schedule(typical, shape)
        sps = self.profile.steps_per_second(shape.num_requests, prefill_tokens=shape.prefill_tokens)
        with_drafts = (shape.num_outputs + expected_accepted(typical, lengths)) * sps(
            shape.num_tokens + sum(lengths)
        )
        plain = self.profile.steps_per_second(shape.num_requests, False, shape.prefill_tokens)(
            shape.num_tokens
        )
        return with_drafts > shape.num_outputs * plain * (1 + self.min_gain)

    def _observe(self, confidences: Sequence[np.ndarray], decay: float = 0.99) -> None:
        for c in confidences:
            if len(c) > len(self.typical):
                grow = len(c) - len(self.typical)
                self.typical = np.concatenate([self.typical, np.zeros(grow)])
                self._seen = np.concatenate([self._seen, np.zeros(grow)])
            n = len(c)
            # Exponential moving average, bias-corrected for the first observations of each position.
            self._seen[:n] = decay * self._seen[:n] + 1
            self.typical[:n] += (np.asarray(c) - self.typical[:n]) / self._seen[:n]


def build_policy(
    config: VerificationConfig, profile: CostProfile | None, profile_pending: bool = False
) -> VerificationPolicy:
    """The configured policy; a scheduler needs a profile, or `profile_pending` (one is being measured)."""
    if config.policy == "fixed":
        return FixedLength()
    if config.policy == "threshold":
        return ConfidenceThreshold(config.threshold)
    if profile is None and not profile_pending:
        raise ValueError("policy 'scheduler' needs a cost profile")
    return ScheduledVerification(profile, config.draft_gate, config.explore_every, config.min_gain)
