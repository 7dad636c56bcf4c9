"""The `dspark` command line: generate (streaming) and bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_GAMMA = {"dspark": 7, "ngram": 4, "none": 0}


def _engine_args(p: argparse.ArgumentParser, proposer: str = "ngram", policy: str = "scheduler") -> None:
    p.add_argument("--model", default="default", help="'default', a Hugging Face folder or a .gguf file")
    p.add_argument("--proposer", choices=["none", "ngram", "dspark"], default=proposer)
    p.add_argument("--drafter", default="default", help="DSpark drafter folder ('default': the shipped one)")
    p.add_argument("--gamma", type=int, default=None, help="draft length (0 = plain decoding; default: "
                   "7 for dspark, 4 for ngram)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--policy", choices=["none", "fixed", "threshold", "scheduler"], default=policy,
                   help=f"verification policy (default: {policy}; scheduler: the hardware-aware prefix "
                   "scheduler)")  # fmt: skip


def _engine_config(args: argparse.Namespace, **overrides):
    from dspark.engine import EngineConfig
    from dspark.scheduling import VerificationConfig

    gamma = args.gamma if args.gamma is not None else DEFAULT_GAMMA[args.proposer]
    overrides.setdefault("verification", VerificationConfig(policy=args.policy))
    return EngineConfig(
        model=args.model, proposer=args.proposer, drafter=args.drafter, num_speculative_tokens=gamma,
        num_threads=args.threads, **overrides,
    )  # fmt: skip


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _generate(args: argparse.Namespace) -> int:
    from dspark.engine import Engine
    from dspark.sampling import SamplingParams

    config = _engine_config(args, max_batch_size=1, max_model_len=4096)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    engine = Engine(config)
    kwargs = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    began, tokens, final = time.perf_counter(), 0, None
    for out in engine.stream(params=params, **kwargs):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        tokens += len(out.token_ids)
        final = out
    elapsed = time.perf_counter() - began
    sys.stdout.write("\n")
    spec = final.spec if final else {}
    print(
        f"[{tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tok/s, tau {spec.get('tau', 0):.2f}, "
        f"finish: {final.finish_reason if final else None}]",
        file=sys.stderr,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dspark.bench import BenchConfig, run_bench

    config = BenchConfig(
        prompts=args.prompts, num_prompts=args.num_prompts, max_tokens=args.max_tokens, model=args.model,
        gammas=args.gammas, compare_transformers=not args.no_transformers, cost_curve=not args.no_cost_curve,
        threads=args.threads, output=args.output, drafters=args.drafters, policies=args.policies,
    )  # fmt: skip
    run_bench(config)
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    import logging

    from dspark.load_bench import LoadBenchConfig, run_load_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = LoadBenchConfig(
        prompts=args.prompts, concurrency=args.concurrency, policies=args.policies, proposer=args.proposer,
        drafter=args.drafter, gamma=args.gamma if args.gamma is not None else DEFAULT_GAMMA[args.proposer],
        threshold=args.threshold, requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
        repeats=args.repeats, model=args.model, threads=args.threads, output=args.output,
    )  # fmt: skip
    report = run_load_bench(config)
    for c, row in report["comparison"].items():
        print(f"concurrency {c}: {row}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import json
    import logging

    from dspark.engine import Engine
    from dspark.scheduling import VerificationConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = _engine_config(
        args, max_batch_size=args.max_batch_size,
        verification=VerificationConfig(policy="scheduler", profile_cache=not args.remeasure),
    )  # fmt: skip
    profile = Engine(config).policy.profile
    text = json.dumps(profile.model_dump(), indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import yaml

    from dspark.serving.config import ServeConfig
    from dspark.serving.launch import serve_forever

    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    for key in ("tensor_parallel_size", "drafter_placement"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.proposer is not None:
        values.setdefault("engine", {})["proposer"] = args.proposer
    config = ServeConfig.model_validate(values)
    serve_forever(config, http_port=args.http_port, grpc_port=args.grpc_port, host=args.host)
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    import yaml

    from dspark.drafters.dspark.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    for key in ("output", "epochs", "max_minutes", "num_prompts", "threads"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_markov:
        values["markov_head"] = False
    print(train(TrainConfig.model_validate(values)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import logging

    from dspark.evaluate import EvalConfig, run_eval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = EvalConfig(
        prompts=args.prompts, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        temperatures=args.temperatures, output=args.output,
        engine=_engine_config(args, max_batch_size=args.batch_size, max_model_len=4096),
    )  # fmt: skip
    report = run_eval(config)
    for result in report["results"]:
        domains = {d: s["tau"] for d, s in result["by_domain"].items()}
        print(f"T={result['temperature']:g}: tau {result['tau']:.3f}, macro over domains "
              f"{result['tau_macro_domains']:.3f}, {domains}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion from the target model")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="tokens/s, tau and speedup over a prompt set; writes JSON")
    bench.add_argument("--prompts", default=None, help="JSONL prompt file (default: shared dev prompts)")
    bench.add_argument("--num-prompts", type=int, default=40)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--model", default="default")
    bench.add_argument("--gammas", type=int, nargs="+", default=[4], help="n-gram draft lengths to compare")
    bench.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    bench.add_argument("--no-cost-curve", action="store_true", help="skip the verify cost curve")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--output", default="results/bench.json")
    bench.add_argument("--drafters", nargs="*", default=[], help="DSpark drafter folders to compare "
                       "('default': the shipped one)")  # fmt: skip
    bench.add_argument(
        "--policies", nargs="+", default=["fixed"], choices=["fixed", "threshold", "scheduler"],
        help="verification policies of the speculative methods (a suffix in the report)",
    )  # fmt: skip
    bench.set_defaults(func=_bench)

    load = sub.add_parser("bench-load", help="verification policies under closed-loop load; JSON + PNGs")
    _engine_args(load)
    load.add_argument("--prompts", default=None, help="JSONL prompt file (default: shared dev prompts)")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    load.add_argument("--policies", nargs="+", default=["none", "fixed", "threshold", "scheduler"],
                      choices=["none", "fixed", "threshold", "scheduler"])  # fmt: skip
    load.add_argument("--threshold", type=float, default=0.3)
    load.add_argument("--requests-per-client", type=int, default=2)
    load.add_argument("--max-tokens", type=int, default=96)
    load.add_argument("--repeats", type=int, default=2)
    load.add_argument("--output", default="results/load.json")
    load.set_defaults(func=_bench_load)

    prof = sub.add_parser("profile", help="the scheduler's cost profile of this machine (cached; JSON)")
    _engine_args(prof)
    prof.add_argument("--max-batch-size", type=int, default=8)
    prof.add_argument("--remeasure", action="store_true", help="measure again, ignoring the cache")
    prof.add_argument("--output", default=None)
    prof.set_defaults(func=_profile)

    srv = sub.add_parser("serve", help="start the Ray Serve application locally (gRPC + OpenAI HTTP)")
    srv.add_argument("--config", default=None, help="YAML ServeConfig (default: built-in defaults)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--tensor-parallel-size", type=int, default=None, help="target ranks per replica")
    srv.add_argument("--drafter-placement", choices=["colocated", "disaggregated"], default=None)
    srv.add_argument("--proposer", choices=["ngram", "dspark", "none"], default=None)
    srv.set_defaults(func=_serve)

    tr = sub.add_parser("train", help="train a DSpark drafter (data generation, training, calibration)")
    tr.add_argument("--config", default=None, help="YAML TrainConfig (e.g. configs/drafter_smollm2.yaml)")
    tr.add_argument("--output", default=None)
    tr.add_argument("--epochs", type=float, default=None)
    tr.add_argument("--max-minutes", type=float, default=None)
    tr.add_argument("--num-prompts", type=int, default=None)
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--no-markov", action="store_true", help="ablation: no Markov head (parallel drafter)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="accepted length tau per dataset/domain; writes JSON and a PNG")
    _engine_args(ev, proposer="dspark", policy="fixed")  # tau of whole drafts
    ev.add_argument("--prompts", default=None, help="JSONL prompt file (default: shared dev prompts)")
    ev.add_argument("--num-prompts", type=int, default=None)
    ev.add_argument("--max-tokens", type=int, default=128)
    ev.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--output", default="results/eval.json")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dspark: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
