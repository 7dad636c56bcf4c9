"""Verification scheduling: how many draft tokens each request sends to the target each step."""

from dspark.scheduling.acceptance import OnlineAcceptanceEstimator
from dspark.scheduling.cost_profile import CostProfile, load_or_measure
from dspark.scheduling.policies import (
    StepShape,
    VerificationConfig,
    VerificationPolicy,
    build_policy,
)
from dspark.scheduling.prefix_scheduler import expected_accepted, prefix_survival, schedule_prefixes

__all__ = [
    "CostProfile",
    "OnlineAcceptanceEstimator",
    "StepShape",
    "VerificationConfig",
    "VerificationPolicy",
    "build_policy",
    "expected_accepted",
    "load_or_measure",
    "prefix_survival",
    "schedule_prefixes",
]
