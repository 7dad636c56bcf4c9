"""Verification scheduling: how many draft tokens each request sends to the target each step."""

from dspark.scheduling.prefix_scheduler import prefix_survival, schedule_prefixes

__all__ = ["prefix_survival", "schedule_prefixes"]
