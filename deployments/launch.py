"""`dspark serve`: a local Ray cluster running the DSpark application, HTTP and gRPC proxies included."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from deployments.dspark_app import build_app
from deployments.workers import placement_bundles
from dspark.serving.config import ServeConfig

RAY_WORKER_NICENESS = "RAY_worker_niceness"  # read by the raylet when it starts
# How often the Serve controller runs its reconciliation loop (Ray's default: 0.1 s). Read by the controller
# process when it starts. At 0.1 s the idle controller takes ~5% of a core, and every slice of it stalls one
# of the engine's two torch threads on a small machine; at 0.5 s it takes ~2%, and replica restarts, health
# checks and scaling decisions wait at most 0.4 s longer (served on 2 cores: 20.4 -> 21.1 tok/s at c=1,
# 45.6 -> 53.4 at c=8 together with the dashboard left off; load_tests/README.md).
CONTROL_LOOP_INTERVAL = ("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")

log = logging.getLogger(__name__)
GRPC_SERVICER = "dspark.v1.dspark_pb2_grpc.add_DSparkServicer_to_server"
APP_NAME = "dspark"


def start(
    config: ServeConfig,
    http_port: int = 8000,
    grpc_port: int = 9000,
    host: str = "127.0.0.1",
    dashboard: bool = False,
):
    """Start Ray (if needed), the Serve proxies and the application; returns its handle.

    `dashboard`: also start Ray's dashboard (port 8265). Off by default for a local server: it costs ~2% of
    a core and GCS traffic while idle. The metrics still reach Prometheus (the per-node metrics agent exports
    them either way), and the KubeRay manifests keep the dashboard on."""
    if not ray.is_initialized():
        # Ray starts its workers (the engine replicas among them) at nice 15 while GCS, the raylet and the
        # dashboard run at 0: on a small machine the engine then yields to Ray's bookkeeping (20.1 vs 28.7
        # tok/s served at c=1 on 2 cores). The engine is the work; run it at the cluster's own priority.
        # RAY_worker_niceness set by the user still wins. KubeRay pods set it in k8s/.
        os.environ.setdefault(RAY_WORKER_NICENESS, "0")
        os.environ.setdefault(*CONTROL_LOOP_INTERVAL)  # the user's own setting wins
        # A laptop may have fewer cores than the configured ranks ask for: advertise enough logical CPUs
        # (the ranks then share cores, as threads would).
        needed = sum(b["CPU"] for b in placement_bundles(config)) * config.autoscaling.max_replicas + 1
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
            log_to_driver=False,
            include_dashboard=dashboard,
        )
    serve.start(
        http_options={"host": host, "port": http_port},
        grpc_options=gRPCOptions(
            port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER], enable_reflection=True
        ),
    )
    return serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/")


# How long SIGTERM waits for in-flight requests before Serve is shut down regardless: the replicas' own
# graceful_shutdown_timeout_s plus a margin for the controller.
DRAIN_MARGIN_S = 10.0


def drain(app: str = APP_NAME, grace_s: float = 30.0, hurry: threading.Event | None = None) -> bool:
    """Stop an application without cutting off its requests: Serve stops routing new ones to its replicas,
    and each replica waits for its ongoing requests (its deployment's graceful_shutdown_timeout_s) before
    it stops. Returns whether that finished within `grace_s` (or before `hurry` was set)."""
    deleting = threading.Thread(target=serve.delete, args=(app,), daemon=True, name="dspark-drain")
    deleting.start()
    deadline = time.monotonic() + grace_s
    while deleting.is_alive() and time.monotonic() < deadline and not (hurry and hurry.is_set()):
        deleting.join(0.1)
    return not deleting.is_alive()


def serve_forever(
    config: ServeConfig, http_port: int, grpc_port: int, host: str, dashboard: bool = False
) -> None:
    """Serve until SIGINT or SIGTERM, then drain in-flight requests (a second signal stops at once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start(config, http_port, grpc_port, host, dashboard)
    print(f"DSpark serving {config.model_id}: OpenAI HTTP on http://{host}:{http_port}/v1, "
          f"gRPC dspark.v1.DSpark on {host}:{grpc_port}. Ctrl-C stops.", flush=True)  # fmt: skip
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        (hurry if stop.is_set() else stop).set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stop.wait()
    grace = config.graceful_shutdown_timeout_s + DRAIN_MARGIN_S
    log.info("stopping: no new requests; in-flight requests have up to %.0fs to finish", grace)
    if not drain(APP_NAME, grace, hurry):
        log.warning("stopping with requests still in flight (grace period over, or a second signal)")
    serve.shutdown()
