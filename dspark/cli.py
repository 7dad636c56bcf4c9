"""The `dspark` command line. Every command's flags are generated from its pydantic config
(`dspark.config_cli`): `--config FILE.yaml` first, then the flags given, one validation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dspark.bench import BenchConfig
from dspark.config_cli import add_config_flags, config_from_args
from dspark.engine import EngineConfig
from dspark.errors import InvalidRequestError
from dspark.evaluate import EvalConfig
from dspark.load_bench import LoadBenchConfig
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeConfig
from dspark.training.train import TrainConfig

log = logging.getLogger("dspark")


class GenerateConfig(BaseModel):
    """`dspark generate`: one streamed completion from the engine in this process."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    raw: bool = Field(False, description="send the prompt as is, not wrapped in the chat template")
    # One request at a time: the hybrid (prompt lookup, else the drafter, scheduled) is the fastest proposer
    # at batch 1 here (1.12x n-gram on held-out prompts; README "Prompt lookup, the drafter, and both").
    engine: EngineConfig = EngineConfig(max_batch_size=1, max_model_len=4096, proposer="hybrid")
    sampling: SamplingParams = SamplingParams(max_tokens=256)


class ProfileConfig(BaseModel):
    """`dspark profile`: the scheduler's cost profile of this machine (cached per machine and model)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = EngineConfig()
    remeasure: bool = Field(
        False, description="measure again and replace the cached profile (a result far off it is remeasured)"
    )
    output: str | None = Field(None, description="also write the profile to this JSON file")


class ExportConfig(BaseModel):
    """`dspark export DRAFTER OUT`: a drafter folder rewritten for vLLM (or as this project's own)."""

    model_config = ConfigDict(extra="forbid")

    drafter: str = Field(description="drafter folder ('default': the shipped one)")
    output: str = Field(description="folder to write")
    format: Literal["vllm", "dspark"] = Field(
        "vllm", description="vllm: what `vllm serve --speculative-config` loads; dspark: this project's own"
    )
    model: str = Field("default", description="the target the drafter was trained for (its LM head rows)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fold_calibration: Literal["greedy", "sampled", "none"] = Field(
        "greedy", description="vllm: which shared confidence scaling to fold into confidence_head.proj"
    )


def _generate(args: argparse.Namespace) -> int:
    from dspark.assembly import build_engine

    config = config_from_args(GenerateConfig, args, prompt=args.prompt)
    engine = build_engine(config.engine, defer_profile=True)  # answer first; a first start profiles after
    prompt = (
        {"prompt": config.prompt}
        if config.raw
        else {"messages": [{"role": "user", "content": config.prompt}]}
    )
    began, tokens, final = time.perf_counter(), 0, None
    for out in engine.stream(params=config.sampling, **prompt):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        tokens += len(out.token_ids)
        final = out
    elapsed = time.perf_counter() - began
    sys.stdout.write("\n")
    tau = final.spec.tau if final is not None and final.spec is not None else 0.0
    print(
        f"[{tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tok/s, tau {tau:.2f}, "
        f"finish: {final.finish_reason if final else None}]",
        file=sys.stderr,
    )
    if engine.profile_measurement is not None:
        log.info("first start on this machine: measuring the cost profile now, for later runs (Ctrl-C skips)")
        engine.profile_measurement.run()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dspark.bench import run_bench

    run_bench(config_from_args(BenchConfig, args))
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from dspark.load_bench import run_load_bench

    report = run_load_bench(config_from_args(LoadBenchConfig, args))
    for c, row in report["comparison"].items():
        print(f"concurrency {c}: {row}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from dspark.assembly import build_engine
    from dspark.scheduling.cost_profile import load_or_measure, profile_dir

    config = config_from_args(ProfileConfig, args)
    fixed = config.engine.verification.model_copy(update={"policy": "fixed"})  # the profile comes below
    engine = build_engine(config.engine.model_copy(update={"verification": fixed}))
    if engine.proposer is None:
        raise InvalidRequestError(
            "proposer", "the cost profile is a speculating engine's: choose ngram, dspark or hybrid"
        )
    directory = profile_dir() if config.engine.verification.profile_cache else None
    profile = load_or_measure(
        engine.model, engine.proposer, config.engine.max_batch_size, engine.num_speculative_tokens,
        directory, remeasure=config.remeasure,
    )  # fmt: skip
    text = json.dumps(profile.model_dump(), indent=1)
    if config.output:
        Path(config.output).write_text(text + "\n")
    print(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deployments.launch import serve_forever

    serve_forever(
        config_from_args(ServeConfig, args),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        host=args.host,
        dashboard=args.dashboard,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from dspark.training.train import train

    print(train(config_from_args(TrainConfig, args)))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from dspark.drafters.dspark.checkpoint import export_drafter, resolve_drafter_dir
    from dspark.models.loader import load_transformer

    config = config_from_args(ExportConfig, args, drafter=args.drafter, output=args.output)
    out = export_drafter(
        resolve_drafter_dir(config.drafter), config.output, load_transformer(config.model, pack=False),
        config.format, getattr(torch, config.dtype), config.fold_calibration,
    )  # fmt: skip
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dspark.evaluate import run_eval

    report = run_eval(config_from_args(EvalConfig, args))
    for result in report["results"]:
        domains = {d: s["tau"] for d, s in result["by_domain"].items()}
        print(f"T={result['temperature']:g}: tau {result['tau']:.3f}, macro over domains "
              f"{result['tau_macro_domains']:.3f}, {domains}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func, model: type[BaseModel], **flags) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_config_flags(p, model, **flags)
        p.set_defaults(func=func)
        return p

    gen = command("generate", "stream a completion from the target model (in this process)", _generate,
                  GenerateConfig, flatten={"engine", "sampling"}, skip={"prompt"})  # fmt: skip
    gen.add_argument("prompt")
    command("bench", "tokens/s, tau and speedup over a prompt set, methods side by side; writes JSON",
            _bench, BenchConfig)  # fmt: skip
    command("bench-load", "verification policies under closed-loop load; JSON + PNGs", _bench_load,
            LoadBenchConfig, flatten={"engine"})  # fmt: skip
    command("profile", "the scheduler's cost profile of this machine (cached; JSON)", _profile,
            ProfileConfig, flatten={"engine"})  # fmt: skip
    srv = command("serve", "start the Ray Serve application locally (gRPC + OpenAI HTTP)", _serve,
                  ServeConfig, flatten={"engine"})  # fmt: skip
    srv.add_argument("--host", default="127.0.0.1", help="address of the HTTP and gRPC proxies")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--dashboard", action="store_true",
                     help="also start Ray's dashboard on port 8265 (off: it costs a small machine ~2%% of a "
                     "core; metrics reach Prometheus either way)")  # fmt: skip
    command("train", "train a DSpark drafter (data generation, training, calibration)", _train, TrainConfig)
    export = command("export", "write a drafter folder for vLLM (or as this project's own format)", _export,
                     ExportConfig, skip={"drafter", "output"})  # fmt: skip
    export.add_argument("drafter", help="drafter folder ('default': the shipped one)")
    export.add_argument("output", help="folder to write")
    command("eval", "accepted length tau per dataset/domain; writes JSON and a PNG", _eval, EvalConfig,
            flatten={"engine"})  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValidationError as err:
        print(f"dspark: error: {InvalidRequestError.from_validation(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"dspark: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
