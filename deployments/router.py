"""Request routing across replicas by expected load (a Ray Serve custom request router).

Each replica reports its running and waiting requests and its recent verification budget
(`record_routing_stats`); expected load is the target tokens per step those imply. The two replicas with
the lowest expected load form the first rank, and Serve's queue-length probe picks between them, which
corrects the stats' staleness between reports (power of two choices, with informed candidates).
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from dspark.serving.monitor import LoadSummary


def expected_load(replica: RunningReplica) -> float:
    stats = replica.routing_stats or {}
    try:
        return LoadSummary.model_validate(stats).expected_load
    except ValueError:  # no report yet: treat as idle
        return 0.0


class ExpectedLoadRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranked = sorted(candidate_replicas, key=expected_load)
        return [ranked[:2], ranked[2:]] if len(ranked) > 2 else [ranked]
