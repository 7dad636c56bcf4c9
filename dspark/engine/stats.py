"""Speculation counters: drafted and accepted tokens, per draft position, and accepted length tau."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel


@dataclass
class StepReport:
    """What one engine step did with speculation (serving metrics and autoscaling read it)."""

    spec: SpecStats = field(default_factory=lambda: SpecStats())  # this step's verification outcomes
    running: int = 0
    waiting: int = 0
    could_draft: int = 0  # requests allowed to speculate this step
    gated: bool = False  # the policy skipped drafting altogether (drafts could not pay at this batch)
    offered: int = 0  # draft tokens the proposer offered
    verified: int = 0  # draft tokens the policy sent to verification
    drafter_fallbacks: int = 0  # requests given no draft because the drafter failed (plain decoding)
    prefix_queried: int = 0  # prompt tokens of requests starting prefill, looked up in the prefix cache
    prefix_hits: int = 0  # of those, reused from it (no prefill)

    @property
    def squeeze(self) -> float:
        """Share of the offered speculation the policy cut (1 when it skipped drafting); 0 when none could."""
        if self.gated:
            return 1.0
        return 1.0 - self.verified / self.offered if self.offered else 0.0


class SpecStats(BaseModel):
    steps: int = 0  # verification steps (forwards that produced at least one token)
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = []  # drafted_at[j]: steps that drafted position j (0-based)
    accepted_at: list[int] = []  # accepted_at[j]: steps that accepted position j
    reached_at: list[int] = []  # reached_at[j]: steps that drafted position j and accepted every earlier one

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        grow = drafted - len(self.drafted_at)
        if grow > 0:
            for counts in (self.drafted_at, self.accepted_at, self.reached_at):
                counts.extend([0] * grow)
        for j in range(drafted):
            self.drafted_at[j] += 1
        for j in range(min(accepted + 1, drafted)):
            self.reached_at[j] += 1
        for j in range(accepted):
            self.accepted_at[j] += 1

    def merge(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        for j in range(len(other.drafted_at)):
            if j == len(self.drafted_at):
                for counts in (self.drafted_at, self.accepted_at, self.reached_at):
                    counts.append(0)
            self.drafted_at[j] += other.drafted_at[j]
            self.accepted_at[j] += other.accepted_at[j]
            self.reached_at[j] += other.reached_at[j]

    @property
    def tau(self) -> float:
        """Mean tokens per verification step, the bonus token included (1.0 for plain decoding)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def conditional_acceptance(self) -> list[float]:
        """P(position j accepted | position j drafted and positions < j accepted)."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached_at, strict=True)]

    def prefix_survival(self) -> list[float]:
        """P(positions 0..j all accepted | position j drafted)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]

    def summary(self) -> SpecSummary:
        return SpecSummary(
            steps=self.steps,
            drafted=self.drafted,
            accepted=self.accepted,
            tau=round(self.tau, 4),
            acceptance_rate=round(self.acceptance_rate, 4),
            conditional_acceptance=[round(x, 4) for x in self.conditional_acceptance()],
            prefix_survival=[round(x, 4) for x in self.prefix_survival()],
            drafted_at=list(self.drafted_at),
            accepted_at=list(self.accepted_at),
            reached_at=list(self.reached_at),
        )

    @classmethod
    def from_summary(cls, summary: SpecSummary) -> SpecStats:
        return cls(
            steps=summary.steps, drafted=summary.drafted, accepted=summary.accepted,
            drafted_at=list(summary.drafted_at), accepted_at=list(summary.accepted_at),
            reached_at=list(summary.reached_at),
        )  # fmt: skip


class SpecSummary(BaseModel):
    """A request's (or a run's) speculation outcome, as front ends and reports show it."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tau: float = 0.0  # tokens per verification step, the bonus token included
    acceptance_rate: float = 0.0
    conditional_acceptance: list[float] = []
    prefix_survival: list[float] = []
    drafted_at: list[int] = []
    accepted_at: list[int] = []
    reached_at: list[int] = []
