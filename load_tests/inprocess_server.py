"""The same engine and OpenAI app as `dspark serve`, in one process without Ray: the in-process reference of
the side-by-side harness (served / in process), through the same HTTP client.

    python -m load_tests.inprocess_server --port 8002 [--max-batch-size 32] [--proposer ngram]

Uses `ServeConfig`'s defaults, as `dspark serve` without `--config` does, and the engine threads of one
replica (`num_cpus`); only the loopback address is served.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from dspark.assembly import build_engine
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.config import ServeConfig
from dspark.serving.openai_api import create_app


def serve_config(max_batch_size: int | None, proposer: str | None) -> ServeConfig:
    cfg = ServeConfig()
    engine = cfg.engine.model_copy(
        update={
            "num_threads": cfg.engine.num_threads or max(1, int(cfg.num_cpus)),
            **({"max_batch_size": max_batch_size} if max_batch_size else {}),
            **({"proposer": proposer} if proposer else {}),
        }
    )
    return ServeConfig.model_validate({**cfg.model_dump(), "engine": engine.model_dump()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--proposer", choices=["none", "ngram", "dspark", "hybrid"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = serve_config(args.max_batch_size, args.proposer)
    engine = AsyncEngine(
        build_engine(cfg.engine, defer_profile=True),
        None,
        cfg.max_queued_requests,
        cfg.stream_interval_s,
        cfg.max_stream_interval_s,
    )
    app = create_app(engine, cfg.model_id, cfg.default_max_tokens, cfg.api_key)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
