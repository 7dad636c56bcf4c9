"""`dspark serve`: a local Ray cluster running the DSpark application, HTTP and gRPC proxies included."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from deployments.dspark_app import build_app
from deployments.workers import placement_bundles
from dspark.serving.config import ServeConfig

log = logging.getLogger(__name__)
GRPC_SERVICER = "dspark.v1.dspark_pb2_grpc.add_DSparkServicer_to_server"


def start(config: ServeConfig, http_port: int = 8000, grpc_port: int = 9000, host: str = "127.0.0.1"):
    """Start Ray (if needed), the Serve proxies and the application; returns its handle."""
    if not ray.is_initialized():
        # A laptop may have fewer cores than the configured ranks ask for: advertise enough logical CPUs
        # (the ranks then share cores, as threads would).
        needed = sum(b["CPU"] for b in placement_bundles(config)) * config.autoscaling.max_replicas + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), log_to_driver=False)
    serve.start(
        http_options={"host": host, "port": http_port},
        grpc_options=gRPCOptions(
            port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER], enable_reflection=True
        ),
    )
    return serve.run(build_app(config.model_dump()), name="dspark", route_prefix="/")


def serve_forever(config: ServeConfig, http_port: int, grpc_port: int, host: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start(config, http_port, grpc_port, host)
    print(f"DSpark serving {config.model_id}: OpenAI HTTP on http://{host}:{http_port}/v1, "
          f"gRPC dspark.v1.DSpark on {host}:{grpc_port}. Ctrl-C stops.", flush=True)  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
