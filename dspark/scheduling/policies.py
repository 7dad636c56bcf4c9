"""Verification policies: how many of each request's draft tokens the target verifies this step.

One engine, one code path: the engine asks the policy for how many requests to call each draft source
(all, one to explore, or none), then hands it every drafting request's per-position confidences and
verifies exactly the prefixes it returns. (Speculation itself is switched off in one place only: the
engine's proposer `none`.) A source is a proposer's name: the hybrid's prompt lookup and draft model are two
sources, gated apart, so the free one keeps drafting at loads where the costly one cannot pay. A free source
is charged no draft time (`StepShape.drafted` 0) and gated only where the scheduler would verify none of its
recent drafts: there its per-step work (lookup, confidences, scheduling) buys nothing.
- `fixed`: verify the whole draft (up to gamma), the classic speculative decoding.
- `threshold`: verify the prefix whose survival probability stays above a static threshold.
- `scheduler`: the hardware-aware prefix scheduler (Algorithm 1) on the profiled cost curve; it also skips
  a source's draft call when its recent drafts could not pay for the call at this batch size. It charges
  each step what its kind's recent steps measured against the profile: a scale and a time per step
  (`MeasuredCosts`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    explore_every: int = Field(
        16, ge=1, description="scheduler: gated steps before a gated source drafts for one request (backoff)"
    )
    min_gain: float = Field(
        0.02, ge=0, lt=1, description="scheduler: least relative gain in expected tokens/s per admitted token"
    )
    measured_costs: bool = Field(
        True, description="scheduler: refit the profile's step times to what measured steps cost"
    )
    profile_cache: bool = Field(True, description="cache the cost profile per machine and model")


@dataclass
class StepShape:
    """The step before any draft token: its decoding requests and their tokens, the tokens it yields anyway
    (one per request whose pending tokens it completes), the prompt-chunk tokens riding along, how many
    requests the profiled draft call serves (None: every decoding request; a hybrid's free lookup: 0), and
    whether some of its requests sample (every row then costs the profile's sampled row time, and a draft
    call its sampled draft time), and the positions its decoding requests hold cached in all (None: the
    profile's context each; longer contexts make every row dearer)."""

    num_requests: int
    num_tokens: int
    num_outputs: int
    prefill_tokens: int = 0
    drafted: int | None = None
    sampled: bool = False
    cached: int | None = None

    @property
    def served(self) -> int:
        """The requests the draft call serves."""
        return self.num_requests if self.drafted is None else self.drafted


class VerificationPolicy(Protocol):
    name: str

    def drafting(self, shape: StepShape, candidates: int, source: str, fallback: Fallback = None) -> int:
        """How many of `candidates` requests to call draft source `source` for this step; `fallback`: the
        confidences of the drafts the candidates hold without it (a hybrid's weak lookup drafts), the value
        its drafts must beat (None: decoding without drafts), computed only if the policy asks."""
        ...

    def lengths(
        self, confidences: Sequence[np.ndarray], shape: StepShape, sources: Sequence[str] | None = None
    ) -> list[int]:
        """Verification length for each drafting request (at most its draft length); `sources` names the
        source of each draft."""
        ...

    def observe(self, shape: StepShape, verified: int, seconds: float) -> None:
        """A finished decoding step: its shape (`drafted`: the requests its draft call served), the draft
        tokens it verified and the seconds it took."""
        ...


class FixedLength:
    name = "fixed"

    def drafting(self, shape: StepShape, candidates: int, source: str, fallback: Fallback = None) -> int:
        return candidates

    def lengths(
        self, confidences: Sequence[np.ndarray], shape: StepShape, sources: Sequence[str] | None = None
    ) -> list[int]:
        return [len(c) for c in confidences]

    def observe(self, shape: StepShape, verified: int, seconds: float) -> None:
        pass


class ConfidenceThreshold:
    name = "threshold"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def drafting(self, shape: StepShape, candidates: int, source: str, fallback: Fallback = None) -> int:
        return candidates

    def lengths(
        self, confidences: Sequence[np.ndarray], shape: StepShape, sources: Sequence[str] | None = None
    ) -> list[int]:
        # Prefix survival is non-increasing, so the positions above the threshold form a prefix.
        return [int((prefix_survival(c) >= self.threshold).sum()) for c in confidences]

    def observe(self, shape: StepShape, verified: int, seconds: float) -> None:
        pass


RECENT_DRAFTS = 64  # drafts per source the gate judges it by
GATE_SAMPLES = 8  # batches of recent drafts a gate verdict averages over
RATE_UPDATES = 16  # a source's gate rate is recomputed once it took this many drafts
MAX_RATES = 4096  # cached gate rates (per source and batch shape) before they are dropped
CONTEXT_BUCKET = 128  # cached positions per request within which a cached gate rate still holds
# Least relative gain in expected tokens/s a costly source's call must promise. At 8 clients the 2-core Xeon
# measured steps whose drafter call was predicted to gain 2-5% losing 4-9% instead: they accepted 5.9 tokens
# where the drafts' confidences promised 6.4 or more (`load_hybrid_v7_kernels16.json`: 0.92x the better arm).
DRAFT_CALL_MARGIN = 0.05
MAX_EXPLORE_BACKOFF = 16  # a gated source is looked at least every 16 x explore_every gated steps


class RecentDrafts:
    """One source's latest drafts' confidences. The gate judges a source by them, not by their mean: a mean
    draft hides the confident drafts the scheduler would verify, and they are where a source pays."""

    def __init__(self, size: int = RECENT_DRAFTS) -> None:
        self.confidences: deque[np.ndarray] = deque(maxlen=size)
        self.updates = 0  # drafts taken in

    def add(self, confidences: np.ndarray) -> None:
        self.updates += 1
        self.confidences.append(np.asarray(confidences, dtype=np.float64))

    def batches(self, size: int, most: int = GATE_SAMPLES) -> list[list[np.ndarray]]:
        """Up to `most` batches of `size` recent drafts, newest first (cycled when fewer are known)."""
        newest = list(reversed(self.confidences))
        count = max(1, min(most, len(newest) // size))
        return [[newest[(b * size + i) % len(newest)] for i in range(size)] for b in range(count)]


COST_SMOOTHING = 1 / 32  # weight of each new step in a kind's measured cost fit (after the first ones)
COST_WARMUP = 8  # steps of a kind measured before its cost fit steers
COST_SPREAD = 0.05  # relative spread of predicted times at which a kind's fit trusts its slope by half
# Steps of a kind whose weight that pseudo-spread carries: a kind seen fewer times leans on the ratio more (a
# few dozen uneven steps once fitted prompt lookup's steps without a call as 1.95 x the profile - 7 ms).
COST_PRIOR_STEPS = 64
MAX_EXTRA = 1.0  # one step counts at most 1 + this times its predicted time (a stall, a GC pause)
MAX_SAVING = 0.5  # and at least 1 - this: a profile far too dear must not make a step cost nothing

# The confidences of the drafts a source's candidates already hold (its gate's bar), on demand: most steps
# under load never need them.
Fallback = Callable[[], Sequence[np.ndarray]] | None

StepKind = tuple[bool, bool]  # (the step called a draft source, some request in it samples)


@dataclass(frozen=True)
class CostFit:
    """A kind of step's measured time as `scale` x its profiled time + `extra` seconds."""

    scale: float = 1.0
    extra: float = 0.0

    def seconds(self, profiled: float) -> float:
        """The step's expected time, kept within [1 - MAX_SAVING, 1 + MAX_EXTRA] x the profile's."""
        expected = self.scale * profiled + self.extra
        return min(max(expected, (1 - MAX_SAVING) * profiled), (1 + MAX_EXTRA) * profiled)


class MeasuredCosts:
    """What decoding steps cost against the cost profile, learnt from the engine's measured step times, per
    kind of step: with or without a draft call, greedy or sampling.

    The profile times the target's forward, the draft call and the sampled rows on filler over 256 cached
    positions (longer contexts priced by its context model); a real step also pays the engine around them
    (scheduling, committing, detokenising: a time per step), a drafter's context update, and, when sampling,
    each draft's distribution widened to the target's vocabulary. A kind's steps are fitted as `scale` x
    profiled time + `extra` (least squares over its recent steps), so the gate weighs a draft call at what it
    really costs on this machine now, not what it cost while profiling (a machine that drifts by tens of
    percent within minutes), and the rows keep their own price. Both parts matter. An added time alone made
    rows look nearly free where long contexts made every row dearer (16 clients on long held-out prompts,
    steps ~25% over the profile: the scheduler lost 5% to plain decoding,
    `load_hybrid_v7_kernels16_margin_heldout.json`). A ratio alone scales every length alike, so the
    engine's time per step never made a longer verification, which spreads that time over more tokens, look
    any better (at batch 1 it verified only what the profile says). The slope is shrunk towards the plain
    ratio (measured / profiled means) as if the steps also spread by COST_SPREAD at that ratio: steps of one
    shape (a steady load) carry no slope, and there the ratio rules.
    A kind not yet measured borrows the other kind's fit with the same sampling."""

    def __init__(self) -> None:
        self._moments: dict[StepKind, np.ndarray] = {}  # per kind: means of x, y, x^2, x y (x: predicted)
        self._seen: dict[StepKind, int] = {}
        self._fits: dict[StepKind, CostFit] = {}  # asked many times a step: kept until the next observation

    def observe(self, kind: StepKind, predicted: float, measured: float) -> None:
        if predicted <= 0:
            return
        y = min(max(measured, (1 - MAX_SAVING) * predicted), (1 + MAX_EXTRA) * predicted)
        sample = np.array([predicted, y, predicted * predicted, predicted * y])
        seen = self._seen.get(kind, 0) + 1
        moments = self._moments.get(kind, sample)
        self._moments[kind] = moments + max(1 / seen, COST_SMOOTHING) * (sample - moments)  # mean, then EMA
        self._seen[kind] = seen
        self._fits.clear()

    def fit(self, kind: StepKind) -> CostFit:
        if kind not in self._fits:
            known = [k for k in (kind, (not kind[0], kind[1])) if self._seen.get(k, 0) >= COST_WARMUP]
            self._fits[kind] = self._fit(known[0]) if known else CostFit()
        return self._fits[kind]

    def _fit(self, kind: StepKind) -> CostFit:
        mx, my, mxx, mxy = self._moments[kind]
        ratio = my / mx
        # A pseudo-spread of steps at the plain ratio, worth COST_PRIOR_STEPS steps (the EMA's memory is ~63)
        prior = (COST_SPREAD * mx) ** 2 * max(1.0, COST_PRIOR_STEPS / self._seen[kind])
        var, cov = max(mxx - mx * mx, 0.0), mxy - mx * my
        scale = min(max((cov + prior * ratio) / (var + prior), 1 - MAX_SAVING), 1 + MAX_EXTRA)
        return CostFit(scale=float(scale), extra=float(my - scale * mx))

    def summary(self) -> dict[str, CostFit]:
        """The fit by kind, for reports ('draft call, greedy': scale 1.02, extra 0.0031 s)."""
        names = {True: "draft call", False: "no draft call"}
        return {
            f"{names[called]}, {'sampled' if sampled else 'greedy'}": self.fit((called, sampled))
            for called, sampled in sorted(self._moments)
        }


class ScheduledVerification:
    """Algorithm 1 on the cost profile, with a draft gate per source fed by its recent drafts' confidences.

    A gated source is still called for one request after `explore_every` gated steps, so its recent
    confidences stay current at one request's draft cost; the interval doubles with each look that finds the
    source still not paying (up to MAX_EXPLORE_BACKOFF times), and resets once it pays. Until it has a
    profile (a first start measures it while the server is idle), it verifies whole drafts as `fixed` does."""

    name = "scheduler"

    def __init__(
        self,
        profile: CostProfile | None,
        draft_gate: bool = True,
        explore_every: int = 16,
        min_gain: float = 0.0,
        measured_costs: bool = True,
    ) -> None:
        self.profile = profile
        self.min_gain = min_gain
        self.costs = MeasuredCosts() if measured_costs else None
        self.draft_gate = draft_gate
        self.explore_every = explore_every
        self.recent: dict[str, RecentDrafts] = {}
        self._gated: dict[str, int] = {}  # per source: consecutive steps the gate skipped
        self._interval: dict[str, int] = {}  # per source: gated steps until the next exploring call
        self._rates: dict[tuple, tuple[int, float]] = {}  # per source and shape: (updates, tokens/s)

    def drafting(self, shape: StepShape, candidates: int, source: str, fallback: Fallback = None) -> int:
        recent = self.recent.get(source)
        if self.profile is None or not self.draft_gate or recent is None or not candidates:
            return candidates
        if self._pays_off(shape, candidates, source, fallback):
            self._gated[source] = 0
            self._interval[source] = self.explore_every
            return candidates
        gated = self._gated.get(source, 0) + 1
        interval = self._interval.get(source, self.explore_every)
        if gated < interval:
            self._gated[source] = gated
            return 0
        # Explore, and back off: each look that finds the source still not paying doubles the wait. A load
        # that drops needs no look (the gate weighs every step's shape); only drifting confidences do.
        self._gated[source] = 0
        self._interval[source] = min(2 * interval, MAX_EXPLORE_BACKOFF * self.explore_every)
        return 1

    def lengths(
        self, confidences: Sequence[np.ndarray], shape: StepShape, sources: Sequence[str] | None = None
    ) -> list[int]:
        for c, source in zip(confidences, sources or [""] * len(confidences), strict=True):
            if len(c):
                self.recent.setdefault(source, RecentDrafts()).add(c)
        if self.profile is None:
            return [len(c) for c in confidences]
        return self._schedule(confidences, shape)

    def observe(self, shape: StepShape, verified: int, seconds: float) -> None:
        if self.profile is None or self.costs is None or shape.prefill_tokens:
            return  # prompt chunks vary too much in cost to learn from
        predicted = self.profile.step_seconds(
            shape.num_requests, shape.num_tokens + verified, shape.served, sampled=shape.sampled,
            cached=shape.cached,
        )  # fmt: skip
        self.costs.observe((shape.served > 0, shape.sampled), predicted, seconds)

    def _steps_per_second(self, shape: StepShape) -> Callable[[int], float]:
        """The profile's SPS(B) for the shape, its step times refitted to what its kind's steps measured."""
        sps = self.profile.steps_per_second(shape.num_requests, shape.drafted, shape.sampled, shape.cached)
        fit = self.costs.fit((shape.served > 0, shape.sampled)) if self.costs else CostFit()
        if fit == CostFit():
            return sps

        def corrected(num_tokens: int) -> float:
            return 1 / fit.seconds(1 / sps(num_tokens))

        return corrected

    def _schedule(self, confidences: Sequence[np.ndarray], shape: StepShape) -> list[int]:
        sps = self._steps_per_second(shape)
        # Algorithm 1 stops at the first admission that does not pay, so that whether a sampled draft token is
        # verified never depends on confidences computed from that token (Appendix A). Greedy drafts are
        # verified by exact match, so that bias cannot arise: a lone greedy request takes the best point of
        # the whole admission path, past a dear row to cheap ones after it (on AVX-512 the block kernel
        # multiplies up to 4 rows per pass over the weights: at one request a fifth row starts a second pass,
        # +20% of the step on the 2-core Xeon, and rows 6-8 ride it at +7-8% each). With more requests the
        # early stop stays (going further out verified more at 16 clients for 7% less throughput,
        # load_ngram_pairs.json).
        early_stop = shape.sampled or shape.num_requests > 1
        return schedule_prefixes(
            confidences, sps, early_stop=early_stop, base_tokens=shape.num_tokens,
            base_outputs=shape.num_outputs, min_gain=self.min_gain,
        )  # fmt: skip

    def _pays_off(self, shape: StepShape, candidates: int, source: str, fallback: Fallback = None) -> bool:
        """Would the source's recent drafts, in batches of `candidates`, raise expected tokens/s above what
        the step yields without calling it: no draft time, and the candidates' `fallback` drafts (none:
        plain decoding)? The call's draft time is that of `shape.drafted` requests (None: all the
        candidates; a free source: 0). A free source costs only its per-step Python: it drafts wherever
        anything would be verified; a costly one must gain DRAFT_CALL_MARGIN (`min_gain` if larger) more."""
        called = shape if shape.drafted is not None else replace(shape, drafted=candidates)
        margin = max(self.min_gain, DRAFT_CALL_MARGIN) if called.drafted else 0.0
        rate = self._source_rate(called, candidates, source)
        bare = replace(shape, drafted=0)
        # The fallback drafts are free, so they yield at least plain decoding: a source that cannot beat
        # plain decoding needs no look at them (the common case under load, where they cost a schedule).
        if rate <= self._rate((), bare) * (1 + margin):
            return False
        return fallback is None or rate > self._rate(fallback(), bare) * (1 + margin)

    def _source_rate(self, called: StepShape, candidates: int, source: str) -> float:
        """Expected tokens/s of a step calling `source` for `candidates` requests, averaged over batches of
        its recent drafts, each cut by the scheduler as a real step would be. Asked every step, so it is
        kept per shape (contexts by CONTEXT_BUCKET positions a request): while the source drafts, until
        RATE_UPDATES more drafts came in; while gated, until it looks."""
        recent = self.recent[source]
        context = None if called.cached is None else called.cached // max(called.num_requests, 1)
        key = (id(self.profile), source, candidates, called.num_requests, called.num_tokens,
               called.num_outputs, called.drafted, called.sampled,
               None if context is None else context // CONTEXT_BUCKET)  # fmt: skip
        gated = self._gated.get(source, 0) > 0 or self._interval.get(source, 0) > self.explore_every
        cached = self._rates.get(key)
        if cached is not None and recent.updates - cached[0] < (1 if gated else RATE_UPDATES):
            return cached[1]
        rate = float(np.mean([self._rate(drafts, called) for drafts in recent.batches(candidates)]))
        if len(self._rates) >= MAX_RATES:  # shapes are many (prompt chunks vary): stay bounded
            self._rates.clear()
        self._rates[key] = (recent.updates, rate)
        return rate

    def _rate(self, drafts: Sequence[np.ndarray], shape: StepShape) -> float:
        """Expected tokens/s of the step verifying what the scheduler admits of `drafts` (none: plain)."""
        if not any(len(c) for c in drafts):  # no draft call; sampling requests still pay for their rows
            return shape.num_outputs * self._steps_per_second(replace(shape, drafted=0))(shape.num_tokens)
        sps = self._steps_per_second(shape)
        lengths = self._schedule(drafts, shape)
        accepted = expected_accepted(drafts, lengths)
        return (shape.num_outputs + accepted) * sps(shape.num_tokens + sum(lengths))


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
    return ScheduledVerification(
        profile, config.draft_gate, config.explore_every, config.min_gain, config.measured_costs
    )
