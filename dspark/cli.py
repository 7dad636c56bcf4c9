"""The `dspark` command line: generate (streaming) and bench."""

from __future__ import annotations

import argparse
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a Hugging Face folder or a .gguf file")
    p.add_argument("--proposer", choices=["none", "ngram"], default="ngram")
    p.add_argument("--gamma", type=int, default=4, help="draft length (0 = plain decoding)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _generate(args: argparse.Namespace) -> int:
    from dspark.engine import Engine, EngineConfig
    from dspark.sampling import SamplingParams

    config = EngineConfig(
        model=args.model, proposer=args.proposer, num_speculative_tokens=args.gamma,
        num_threads=args.threads, max_batch_size=1, max_model_len=4096,
    )  # fmt: skip
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
        threads=args.threads, output=args.output,
    )  # fmt: skip
    run_bench(config)
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
    bench.set_defaults(func=_bench)
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
