"""`dspark bench`: every method's output equals transformers' greedy output, per verification policy."""

from __future__ import annotations

import json

from dspark.bench import BenchConfig, run_bench
from dspark.prompts import PromptRecord

PROMPTS = ["List three colours.", "Write a Python function that adds two numbers."]


def test_bench_methods_match_transformers_under_each_policy(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            PromptRecord(id=f"p{i}", dataset="t", domain="chat", turns=[p]).model_dump_json()
            for i, p in enumerate(PROMPTS)
        )
    )
    config = BenchConfig(
        prompts=str(prompts), num_prompts=2, max_tokens=12, num_speculative_tokens=[2], drafters=["default"],
        policies=["fixed", "scheduler"], cost_curve=False, output=str(tmp_path / "bench.json"),
    )  # fmt: skip
    report = run_bench(config)

    speculative = {"ngram_g2", "dspark", "ngram_g2_scheduler", "dspark_scheduler"}
    assert set(report["methods"]) == {"plain", "transformers", *speculative}
    assert set(report["speculation"]) == speculative
    # identical_outputs compares every method, transformers included, with plain decoding
    assert report["identical_outputs"] == len(PROMPTS)
    assert all(m["tokens"] == 12 * len(PROMPTS) for m in report["methods"].values())
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["policies"] == ["fixed", "scheduler"]
