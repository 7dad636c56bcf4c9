"""Recipe arms: drafters trained at one budget, differing in one choice each, judged by tau per domain.

`python -m dspark.training.recipe --config configs/recipe_arms.yaml` trains every arm (each through
`train`, so each resumes), evaluates it with `run_eval` (greedy, whole drafts, the dev prompt subset) and
writes one JSON report, rewritten after each arm; an arm already in the report is not run again. The CPU time
of an arm is the wall time of its `train` call on the otherwise idle machine (data generation excluded: the
arms share cached data, generated before the first arm).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from dspark.engine import EngineConfig
from dspark.evaluate import EvalConfig, run_eval
from dspark.prompts import write_json
from dspark.runtime import cache_root
from dspark.scheduling import VerificationConfig
from dspark.training.train import TrainConfig, ensure_data, train

log = logging.getLogger(__name__)


class RecipeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: TrainConfig = Field(description="what every arm shares; `output` is replaced per arm")
    arms: dict[str, dict[str, JsonValue]] = Field(description="arm name -> TrainConfig fields it changes")
    arms_dir: str = Field("", description="'' = <cache>/recipe_arms/<arm>")
    data_name: str = Field(
        "recipe", description="the shared data: <cache>/drafter_data/<data_name> (when base.data_dir is '')"
    )
    eval_prompts: int = Field(62, ge=1, description="dev prompts, datasets interleaved")
    max_tokens: int = Field(128, ge=1)
    output: str = "benchmarks/results/drafter/recipe_arms.json"

    @model_validator(mode="after")
    def _arms_validate(self) -> RecipeConfig:
        for name in self.arms:
            self.arm(name)  # a misspelt field fails when the file is read, not hours into a run
        return self

    def arm(self, name: str) -> TrainConfig:
        root = Path(self.arms_dir) if self.arms_dir else cache_root() / "recipe_arms"
        data_dir = self.base.data_dir or str(cache_root() / "drafter_data" / self.data_name)
        where = {"output": str(root / name), "data_dir": data_dir}
        return TrainConfig.model_validate({**self.base.model_dump(), **self.arms[name], **where})


def held_out(out: Path) -> dict:
    """Teacher-forced greedy acceptance by position on the held-out sequences, and the worst position's
    cross-fitted ECE as shipped, greedy and sampled (from `calibration_report.json`)."""
    report = json.loads((out / "calibration_report.json").read_text())
    worst = {mode: max(report[mode]["ece_" + report[mode]["shipped"]]) for mode in ("greedy", "sampled")}
    return {
        "heldout_accuracy_greedy": [round(x, 4) for x in report["greedy"]["acceptance_by_position"]],
        "worst_ece": {mode: round(x, 4) for mode, x in worst.items()},
    }


def run_arm(recipe: RecipeConfig, name: str) -> dict:
    cfg = recipe.arm(name)
    ensure_data(cfg)  # generated (or found) outside the timed call
    began = time.monotonic()
    out = train(cfg)
    minutes = (time.monotonic() - began) / 60
    history = json.loads((out / "train_history.json").read_text())
    engine = EngineConfig(
        proposer="dspark", drafter=str(out), max_batch_size=8, max_model_len=4096,
        verification=VerificationConfig(policy="fixed"), num_threads=cfg.num_threads,
    )  # fmt: skip
    report = run_eval(
        EvalConfig(
            num_prompts=recipe.eval_prompts, max_tokens=recipe.max_tokens, temperatures=[0.0], engine=engine,
            output=str(out / "eval.json"),
        )
    )  # fmt: skip
    result = report["results"][0]
    return {
        "changes": recipe.arms[name],
        "steps": history[-1]["step"] if history else 0,
        "train_minutes": round(minutes, 1),
        "tau_macro_domains": result["tau_macro_domains"],
        "tau": result["tau"],
        "tau_by_domain": {d: s["tau"] for d, s in result["by_domain"].items()},
        "conditional_acceptance": result["conditional_acceptance"],
        **held_out(out),
        "final_losses": {k: round(v, 4) for k, v in history[-1].items() if k != "step"} if history else {},
    }


def run_recipe(recipe: RecipeConfig, only: list[str] | None = None) -> dict:
    path = Path(recipe.output)
    report = json.loads(path.read_text()) if path.exists() else {"base": recipe.base.model_dump(), "arms": {}}
    for name in only or list(recipe.arms):
        if name in report["arms"]:
            log.info("arm %s: already in %s", name, path)
            continue
        log.info("arm %s: %s", name, recipe.arms[name])
        report["arms"][name] = run_arm(recipe, name)
        write_json(path, report)
    return report


def arms_table(report: dict) -> str:
    """Markdown: one row per arm, tau per domain and macro, its training cost and held-out numbers."""
    arms = report["arms"]
    domains = sorted({d for arm in arms.values() for d in arm["tau_by_domain"]})
    head = ["arm", "changes", "steps", "train min", *domains, "macro", "held-out acc. pos 1 / 7", "worst ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, arm in arms.items():
        changes = ", ".join(f"{k}: {v}" for k, v in arm["changes"].items()) or "-"
        acc = arm["heldout_accuracy_greedy"]
        cells = [
            name, changes, str(arm["steps"]), f"{arm['train_minutes']:.1f}",
            *(f"{arm['tau_by_domain'].get(d, float('nan')):.2f}" for d in domains),
            f"**{arm['tau_macro_domains']:.3f}**", f"{acc[0]:.3f} / {acc[-1]:.3f}",
            f"{100 * arm['worst_ece']['greedy']:.1f}%",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/recipe_arms.yaml")
    parser.add_argument("--arms", nargs="*", help="run only these arms (default: all, in the file's order)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = RecipeConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    print(arms_table(run_recipe(recipe, args.arms)))


if __name__ == "__main__":
    main()
