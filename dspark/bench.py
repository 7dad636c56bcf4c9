"""`dspark bench`: decoding speed of this engine against transformers, side by side in one run.

For every prompt (batch 1, greedy) the methods run back to back, so machine noise hits them alike; the
report gives totals, per-prompt medians and the median of per-prompt ratios. It also records the target's
cost profile (forward time by requests and tokens per request; see dspark/scheduling/cost_profile.py).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from dspark.assembly import build_engine
from dspark.engine import Engine, EngineConfig
from dspark.engine.config import ProposerName
from dspark.models.loader import resolve_model_dir
from dspark.prompts import load_prompts, write_json
from dspark.sampling import SamplingParams
from dspark.scheduling.cost_profile import measure_profile
from dspark.scheduling.policies import PolicyName, ScheduledVerification, VerificationConfig

log = logging.getLogger(__name__)


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: str | None = Field(None, description="JSONL prompt file (default: data/dev_prompts.jsonl)")
    num_prompts: int = Field(40, ge=1, description="prompts, datasets interleaved")
    skip_prompts: int = Field(
        0, ge=0, description="skip the first prompts of that order (a sample held out from earlier tuning)"
    )
    max_tokens: int = Field(128, ge=1, description="tokens generated per prompt")
    model: str = Field("default", description="'default', a Hugging Face folder or a .gguf file")
    num_speculative_tokens: list[int] = Field([4], description="n-gram draft lengths compared")
    drafters: list[str] = Field(
        [], description="DSpark drafter folders compared ('default': the shipped one), each at its block size"
    )
    hybrid: bool = Field(False, description="also each drafter behind prompt lookup (proposer hybrid)")
    policies: list[PolicyName] = Field(
        ["fixed"], description="verification policies of every speculative method"
    )
    compare_transformers: bool = Field(True, description="time transformers' generate too")
    cost_curve: bool = Field(True, description="measure the verify cost curve (minutes) after the run")
    num_threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")
    output: str = Field("results/bench.json", description="report path (JSON)")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _timed(run: Callable[[list[int]], list[int]], ids: list[int]) -> tuple[list[int], float]:
    began = time.perf_counter()
    tokens = run(ids)
    return tokens, time.perf_counter() - began


def _transformers_runner(model_dir: str, max_tokens: int) -> Callable[[list[int]], list[int]]:
    from transformers import AutoModelForCausalLM

    # safetensors only: a folder with pickled weights (pytorch_model.bin) is refused, not unpickled.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()

    def run(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    return run


def _engine_runner(engine: Engine, max_tokens: int) -> Callable[[list[int]], list[int]]:
    params = SamplingParams(max_tokens=max_tokens)

    def run(ids: list[int]) -> list[int]:
        return [t for out in engine.stream(ids, params) for t in out.token_ids]

    return run


def _method_summary(rows: list[dict], name: str) -> dict:
    tokens = sum(r[name]["tokens"] for r in rows)
    seconds = sum(r[name]["seconds"] for r in rows)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "median_prompt_tokens_per_s": round(
            _median([r[name]["tokens"] / r[name]["seconds"] for r in rows]), 2
        ),
    }


def _ratio(rows: list[dict], num: str, den: str) -> float:
    return round(_median([r[den]["seconds"] / r[num]["seconds"] for r in rows]), 3)


def _drafter_label(drafter: str) -> str:
    return "dspark" if drafter == "default" else f"dspark_{Path(drafter).name}"


def _policy_label(label: str, policy: PolicyName) -> str:
    return label if policy == "fixed" else f"{label}_{policy}"


def run_bench(config: BenchConfig) -> dict:
    records = load_prompts(config.prompts, config.num_prompts, config.skip_prompts)
    log.info("bench: %d prompts x %d tokens; building engines (a scheduler policy measures the cost profile "
             "once per machine, a few minutes)", len(records), config.max_tokens)  # fmt: skip
    plain = build_engine(
        EngineConfig(
            model=config.model,
            proposer="none",
            max_batch_size=1,
            max_model_len=4096,
            num_threads=config.num_threads,
        )
    )

    def engine(proposer: ProposerName, length: int | None, drafter: str = "default",
               policy: PolicyName = "fixed") -> Engine:  # fmt: skip
        cfg = plain.config.model_copy(update={
            "proposer": proposer, "num_speculative_tokens": length, "drafter": drafter,
            "verification": VerificationConfig(policy=policy),
        })  # fmt: skip
        return build_engine(cfg, model=plain.model, tokenizer=plain.tokenizer)

    runners: dict[str, Callable[[list[int]], list[int]]] = {"plain": _engine_runner(plain, config.max_tokens)}
    spec_engines = {}
    for policy in config.policies:
        spec_engines |= {
            _policy_label(f"ngram_g{n}", policy): engine("ngram", n, policy=policy)
            for n in config.num_speculative_tokens
        }
        spec_engines |= {  # each drafter at its own block size
            _policy_label(_drafter_label(d), policy): engine("dspark", None, d, policy)
            for d in config.drafters
        }
        spec_engines |= {
            _policy_label("hybrid_" + _drafter_label(d), policy): engine("hybrid", None, d, policy)
            for d in (config.drafters if config.hybrid else [])
        }
    runners |= {name: _engine_runner(e, config.max_tokens) for name, e in spec_engines.items()}
    if config.compare_transformers:
        runners["transformers"] = _transformers_runner(
            str(resolve_model_dir(config.model)), config.max_tokens
        )

    rows = []
    for i, record in enumerate(tqdm(records, desc="bench prompts", unit="prompt")):
        ids = plain.encode_prompt(messages=[{"role": "user", "content": record.turns[0]}])
        row: dict = {"id": record.id, "dataset": record.dataset, "prompt_tokens": len(ids)}
        outputs = {}
        for name, run in runners.items():
            outputs[name], seconds = _timed(run, ids)
            row[name] = {"tokens": len(outputs[name]), "seconds": round(seconds, 4)}
        row["identical_outputs"] = all(out == outputs["plain"] for out in outputs.values())
        rows.append(row)
        log.debug(
            "prompt %d/%d %s: %s",
            i + 1,
            len(records),
            record.id,
            {k: round(v["tokens"] / v["seconds"], 1) for k, v in row.items() if isinstance(v, dict)},
        )

    report: dict = {
        "config": config.model_dump(),
        "threads": torch.get_num_threads(),
        "methods": {name: _method_summary(rows, name) for name in runners},
        "speedup_vs_plain": {name: _ratio(rows, name, "plain") for name in runners if name != "plain"},
        "identical_outputs": sum(r["identical_outputs"] for r in rows),
        "speculation": {name: e.stats.summary().model_dump() for name, e in spec_engines.items()},
        "measured_costs": {  # what the scheduler learnt its steps cost against the profile
            name: {kind: asdict(fit) for kind, fit in e.policy.costs.summary().items()}
            for name, e in spec_engines.items()
            if isinstance(e.policy, ScheduledVerification) and e.policy.costs is not None
        },
    }
    if config.compare_transformers:
        report["speedup_vs_transformers"] = {
            n: _ratio(rows, n, "transformers") for n in runners if n != "transformers"
        }
    if config.cost_curve:  # the scheduler's cost profile, without a drafter
        log.info("measuring the verify cost curve (16 requests x up to 17 tokens)")
        report["cost_profile"] = measure_profile(plain.model, None, 16, 16, "bench").model_dump()
    report["prompts"] = rows
    write_json(config.output, report)
    summary = {k: v for k, v in report.items() if k not in ("prompts", "config")}
    log.info("bench summary: %s", summary)
    print(summary)
    return report
