"""Serve autoscaling: ongoing requests (Serve's default policy), plus scale-out when the verification
scheduler keeps squeezing speculation budgets.

A squeezed budget means each replica's target is saturated: the scheduler cut the drafts it was offered
because a bigger batch of plain tokens paid more. Queue length alone misses this (requests still flow,
just at lower per-user speed), so a replica that stays squeezed under real load asks for one more replica.
Replicas report `budget_squeeze` and `ongoing` through `record_autoscaling_stats`.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

SQUEEZE_THRESHOLD = 0.6  # mean share of offered speculation cut, across replicas
MIN_ONGOING_PER_REPLICA = 2.0  # below this a squeeze is an estimate's noise, not saturation
SQUEEZED_PERIODS = 3  # consecutive control-loop periods before acting (Serve's period is 0.1 s... 1 s)


def squeezed_decision(
    default: int, current: int, max_replicas: int, squeeze: float, ongoing_per_replica: float, periods: int
) -> tuple[int, int]:
    """(replicas, squeezed periods so far): one more replica than now once the squeeze has persisted."""
    if squeeze < SQUEEZE_THRESHOLD or ongoing_per_replica < MIN_ONGOING_PER_REPLICA:
        return default, 0
    periods += 1
    if periods >= SQUEEZED_PERIODS and default <= current < max_replicas:
        return current + 1, 0
    return default, periods


def budget_aware_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    default, state = replica_queue_length_autoscaling_policy(ctx)
    metrics = ctx.aggregated_metrics or {}
    squeezes = list(metrics.get("budget_squeeze", {}).values())
    if not squeezes or not ctx.current_num_replicas:
        return default, state
    ongoing = ctx.total_num_requests / ctx.current_num_replicas
    replicas, periods = squeezed_decision(
        int(default), ctx.current_num_replicas, ctx.capacity_adjusted_max_replicas,
        sum(squeezes) / len(squeezes), ongoing, int(state.get("squeezed_periods", 0)),
    )  # fmt: skip
    return replicas, {**state, "squeezed_periods": periods}
