"""`dspark eval`: accepted length tau of a proposer on a prompt set, per dataset and domain.

Runs real speculative decoding through the engine (so tau counts what verification accepted, the bonus
token included) at each requested temperature, and reports tau and the position-wise conditional
acceptance P(position k accepted | positions < k accepted). Writes JSON and a PNG plot.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from dspark.assembly import build_engine
from dspark.engine import Engine, EngineConfig
from dspark.engine.stats import SpecStats
from dspark.prompts import PromptRecord, load_prompts, write_json
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig

log = logging.getLogger(__name__)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: str | None = Field(None, description="JSONL prompt file (default: data/dev_prompts.jsonl)")
    num_prompts: int | None = Field(None, ge=1, description="prompts, datasets interleaved (default: all)")
    max_tokens: int = Field(128, ge=1, description="tokens generated per prompt")
    temperatures: list[float] = Field([0.0, 1.0], description="sampling temperatures evaluated")
    # tau of whole drafts: the eval verifies every drafted token (policy fixed), at the drafter's block size
    engine: EngineConfig = EngineConfig(
        proposer="dspark",
        max_batch_size=8,
        max_model_len=4096,
        verification=VerificationConfig(policy="fixed"),
    )
    seed: int = Field(0, description="seed of the sampled requests")
    output: str = Field("results/eval.json", description="report path (JSON; the plot goes next to it)")


def _stats_by(records: list[PromptRecord], stats: list[SpecStats], key: str) -> dict[str, SpecStats]:
    groups: dict[str, SpecStats] = defaultdict(SpecStats)
    for record, s in zip(records, stats, strict=True):
        groups[getattr(record, key)].merge(s)
    return dict(sorted(groups.items()))


def _summaries(groups: dict[str, SpecStats]) -> dict[str, dict]:
    return {
        name: {"tau": round(s.tau, 4), "steps": s.steps,
               "conditional_acceptance": [round(x, 4) for x in s.conditional_acceptance()],
               "prefix_survival": [round(x, 4) for x in s.prefix_survival()]}
        for name, s in groups.items()
    }  # fmt: skip


def evaluate_temperature(engine: Engine, records: list[PromptRecord], config: EvalConfig, t: float) -> dict:
    params = [
        SamplingParams(max_tokens=config.max_tokens, temperature=t, seed=config.seed + i)
        for i in range(len(records))
    ]
    ids = [
        engine.add_request(messages=[{"role": "user", "content": r.turns[0]}], params=p)
        for r, p in zip(records, params, strict=True)
    ]
    finals = {}
    with tqdm(total=len(ids), desc=f"eval T={t:g}", unit="prompt") as progress:
        for out in engine.run_until_done():
            if out.finished:
                finals[out.request_id] = out
                progress.update(1)
    stats = [SpecStats.from_summary(finals[i].spec) for i in ids]
    total = SpecStats()
    for s in stats:
        total.merge(s)
    by_domain = _stats_by(records, stats, "domain")
    return {
        "temperature": t,
        "tau": round(total.tau, 4),
        "tau_macro_domains": round(statistics.mean(s.tau for s in by_domain.values()), 4),
        "conditional_acceptance": [round(x, 4) for x in total.conditional_acceptance()],
        "by_domain": _summaries(by_domain),
        "by_dataset": _summaries(_stats_by(records, stats, "dataset")),
    }


def plot_acceptance(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for domain, s in result["by_domain"].items():
            ax.plot(range(1, len(s["conditional_acceptance"]) + 1), s["conditional_acceptance"], "o-",
                    label=f"{domain} (tau {s['tau']:.2f})")  # fmt: skip
        ax.set(title=f"temperature {result['temperature']:g}", xlabel="draft position k",
               ylabel="P(accept k | accepted < k)", ylim=(0, 1))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(config: EvalConfig) -> dict:
    torch.manual_seed(config.seed)
    records = load_prompts(config.prompts, config.num_prompts)
    engine = build_engine(config.engine)
    log.info("eval: %d prompts x %d tokens at temperatures %s, proposer %s, draft length %d",
             len(records), config.max_tokens, config.temperatures, engine.config.proposer,
             engine.num_speculative_tokens)  # fmt: skip
    results = []
    for t in config.temperatures:
        results.append(evaluate_temperature(engine, records, config, t))
        log.info("temperature %g: tau %.3f by domain %s", t, results[-1]["tau"],
                 {d: s["tau"] for d, s in results[-1]["by_domain"].items()})  # fmt: skip
    report = {"config": config.model_dump(), "num_prompts": len(records), "results": results}
    write_json(config.output, report)
    plot_acceptance(results, Path(config.output).with_suffix(".png"))
    return report


def tau_table(reports: dict[str, dict], temperature: float) -> str:
    """Markdown: tau per domain and macro average, one row per labelled eval report."""
    rows = []
    for label, report in reports.items():
        result = next(r for r in report["results"] if r["temperature"] == temperature)
        domains = result["by_domain"]
        rows.append((label, {d: s["tau"] for d, s in domains.items()}, result["tau_macro_domains"]))
    names = sorted({d for _, taus, _ in rows for d in taus})
    lines = [
        "| drafter | " + " | ".join(names) + " | macro |",
        "| --- |" + " --- |" * (len(names) + 1),
    ]
    lines += [
        f"| {label} | " + " | ".join(f"{taus.get(d, 0):.2f}" for d in names) + f" | {macro:.2f} |"
        for label, taus, macro in rows
    ]
    return "\n".join(lines)
