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


def test_held_out_prompts_continue_the_interleaved_order(tmp_path):
    from dspark.prompts import load_prompts

    path = tmp_path / "prompts.jsonl"
    records = [
        PromptRecord(id=f"{d}{i}", dataset=d, domain="x", turns=["hi"]) for d in "abc" for i in range(4)
    ]
    path.write_text("\n".join(r.model_dump_json() for r in records))
    first, held_out = load_prompts(path, 6), load_prompts(path, 6, skip=6)
    assert [r.id for r in first + held_out[:3]] == [r.id for r in load_prompts(path, 9)]
    assert not {r.id for r in first} & {r.id for r in held_out}
    assert {r.dataset for r in held_out} == {"a", "b", "c"}
    assert [r.id for r in load_prompts(path, skip=10)] == [r.id for r in load_prompts(path, 11, skip=9)][1:]


class _FakeEngine:
    """Each request emits one token per step and finishes after `length` tokens; a step takes one second
    of a fake clock, so the closed loop's windows are exact."""

    def __init__(self, clock: list[float], length: int) -> None:
        from dspark.engine.stats import SpecStats

        self.clock, self.length, self.stats = clock, length, SpecStats()
        self.emitted: dict[str, int] = {}

    def add_request(self, prompt, params, speculate=True) -> str:
        self.emitted[f"r{len(self.emitted)}"] = 0
        return f"r{len(self.emitted) - 1}"

    def has_unfinished(self) -> bool:
        return any(n < self.length for n in self.emitted.values())

    def step(self) -> list:
        from types import SimpleNamespace

        self.clock[0] += 1.0
        live = [rid for rid, n in self.emitted.items() if n < self.length]
        for rid in live:
            self.emitted[rid] += 1
        return [
            SimpleNamespace(request_id=rid, token_ids=[7], finished=self.emitted[rid] == self.length)
            for rid in live
        ]


def test_full_load_rate_counts_only_the_window_where_every_client_is_busy(monkeypatch):
    """Two clients, three 4-token requests: both busy for steps 1-4 (8 tokens), then the third request runs
    alone for steps 5-8. The run's rate is 12 / 8; the full-load rate is 8 / 4."""
    from dspark import load_bench
    from dspark.sampling import SamplingParams

    clock = [100.0]
    monkeypatch.setattr(load_bench.time, "perf_counter", lambda: clock[0])
    run = load_bench.closed_loop(_FakeEngine(clock, 4), [[1, 2]], 2, 3, SamplingParams())
    assert run["output_tokens"] == 12 and run["seconds"] == 8.0
    assert run["throughput_tokens_per_s"] == 1.5
    assert run["full_load_seconds"] == 4.0 and run["full_load_tokens_per_s"] == 2.0
