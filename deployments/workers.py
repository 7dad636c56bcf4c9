"""A replica's workers: tensor-parallel target ranks and a disaggregated draft worker, as Ray actors.

The replica process is rank 0 (it runs the engine, as vLLM's driver worker does): ranks 1..N-1 are
`TargetWorker` actors that follow its forwards over torch.distributed, and with `drafter_placement:
disaggregated` the drafter lives in a `DraftWorker` actor, called once per step. Every actor is placed in
the replica's own placement group (bundle 0 holds the replica, then one bundle per follower, then the
drafter's), so a replica and its workers are scheduled, and released, together.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dspark.assembly import build_engine, build_proposer, draft_worker_config, with_lookup
from dspark.distributed.tensor_parallel import free_rendezvous, run_follower, start_leader, stop_leader
from dspark.engine import Engine, EngineConfig
from dspark.models.loader import load_transformer
from dspark.proposers.remote import DraftCall, ProposerHost, ProposerInfo, RemoteProposer
from dspark.runtime import set_threads
from dspark.serving.config import ServeConfig


@ray.remote
class TargetWorker:
    """Tensor-parallel rank > 0: holds its shard and runs every forward rank 0 broadcasts."""

    def follow(self, source: str, rank: int, world_size: int, init_method: str, threads: int) -> None:
        run_follower(source, rank, world_size, init_method, threads)


# Ray restarts a dead draft worker (its drafter rebuilt, its request state empty); meanwhile, and while
# the RemoteProposer resynchronises, the engine decodes without drafts (dspark/proposers/remote.py).
@ray.remote(max_restarts=-1, max_task_retries=0)
class DraftWorker:
    """Hosts the drafter; the engine's RemoteProposer sends it one DraftCall per step."""

    def __init__(self, engine_config: dict, threads: int) -> None:
        set_threads(threads)
        config = EngineConfig.model_validate(engine_config)
        # A DSpark drafter shares the target's embeddings and LM head; an n-gram drafter needs no model.
        target = load_transformer(config.model) if config.proposer == "dspark" else None
        self.host = ProposerHost(build_proposer(config, target))

    def describe(self) -> ProposerInfo:
        return self.host.describe()

    def handle(self, call: DraftCall):
        return self.host.handle(call)


class ActorTransport:
    """A RemoteProposer's transport to a DraftWorker: one actor call, awaited until its deadline.

    A call past its deadline raises (the proposer falls back to plain decoding) and is cancelled if it
    still waits in the actor's queue; one already running finishes there, which the proposer's
    resynchronisation allows for."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def __call__(self, call: DraftCall, timeout: float | None) -> list:
        ref = self.actor.handle.remote(call)
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):  # best effort: the actor may be gone
                ray.cancel(ref)
            raise


def placement_bundles(cfg: ServeConfig) -> list[dict[str, float]]:
    """Bundle 0: the replica (rank 0); then one per follower rank; then the disaggregated drafter."""
    bundles = [_resources(cfg.num_cpus, cfg.num_gpus) for _ in range(cfg.tensor_parallel_size)]
    if cfg.engine.speculative and cfg.drafter_placement == "disaggregated":
        bundles.append(_resources(cfg.drafter_num_cpus, cfg.drafter_num_gpus))
    return bundles


def _resources(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def _in_bundle(actor_class, index: int, num_cpus: float, num_gpus: float, *args):
    group = get_current_placement_group()
    strategy = (
        PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
        if group is not None
        else None  # outside Serve (tests, scripts): plain scheduling
    )
    return actor_class.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategy).remote(
        *args
    )


@dataclass
class ReplicaWorkers:
    """The engine of one replica and the actors behind it."""

    engine: Engine
    followers: list = field(default_factory=list)
    follower_runs: list = field(default_factory=list)
    drafter: object | None = None

    def shutdown(self) -> None:
        if len(self.followers):
            stop_leader(self.engine.model)
            ray.get(self.follower_runs, timeout=30)
        for actor in [*self.followers, *([self.drafter] if self.drafter is not None else [])]:
            ray.kill(actor)  # no_restart=True: a restartable draft worker stays down


def start_replica(cfg: ServeConfig) -> ReplicaWorkers:
    """Start the followers and drafter actors, join the tensor-parallel group, build the engine."""
    threads = max(1, int(cfg.num_cpus))
    engine_config = cfg.engine.model_copy(update={"num_threads": cfg.engine.num_threads or threads})
    followers, runs, model = [], [], None
    world = cfg.tensor_parallel_size
    if world > 1:
        init_method = free_rendezvous(ray.util.get_node_ip_address())
        followers = [_in_bundle(TargetWorker, r, cfg.num_cpus, cfg.num_gpus) for r in range(1, world)]
        runs = [
            w.follow.remote(cfg.engine.model, r, world, init_method, threads)
            for r, w in enumerate(followers, start=1)
        ]
        model = start_leader(cfg.engine.model, world, init_method)
    drafter, proposer = None, None
    if cfg.engine.speculative and cfg.drafter_placement == "disaggregated":
        drafter_threads = max(1, int(cfg.drafter_num_cpus))
        drafter = _in_bundle(
            DraftWorker,
            world,
            cfg.drafter_num_cpus,
            cfg.drafter_num_gpus,
            draft_worker_config(cfg.engine).model_dump(),
            drafter_threads,
        )
        info = ray.get(drafter.describe.remote())
        proposer = RemoteProposer(ActorTransport(drafter), info, deadline_s=cfg.drafter_timeout_s)
        if cfg.engine.proposer == "hybrid":
            proposer = with_lookup(cfg.engine, proposer)
    # A first start answers at once and measures the cost profile in the replica's idle time, as it serves.
    engine = build_engine(engine_config, model=model, proposer=proposer, defer_profile=True)
    return ReplicaWorkers(engine, followers, runs, drafter)
