"""Sampled decoding, batch 1: tokens/s of plain decoding and of the drafter, greedy and sampled, on held-out
dev prompts (medians over prompts, and medians of per-prompt ratios to plain decoding; the methods run back to
back on each prompt). Run from the repository root:

    .venv/bin/python benchmarks/results/sampling/sampled_decoding.py OUT.json [NUM_PROMPTS]

It uses only the public engine API. "dspark_scheduler_profile_only" decides by the cost profile alone, without
what measured steps cost beyond it (`measured_costs`); drop it to run against a checkout older than that.
"""

import json
import statistics
import sys
import time

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.models.loader import load_tokenizer, load_transformer
from dspark.prompts import load_prompts
from dspark.runtime import set_threads
from dspark.sampling import SamplingParams
from dspark.scheduling.policies import ScheduledVerification

set_threads(2)
out_path, num_prompts = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
model, tokenizer = load_transformer("default"), load_tokenizer("default")
prompts = load_prompts(None, limit=40 + num_prompts, skip=40)[:num_prompts]  # after the tuned-on 40
SAMPLINGS = {"greedy": {}, "t0.8_top_p0.9": {"temperature": 0.8, "top_p": 0.9}}
METHODS = {  # proposer, verification
    "plain": ("none", {"policy": "fixed"}),
    "dspark_fixed": ("dspark", {"policy": "fixed"}),
    "dspark_scheduler": ("dspark", {"policy": "scheduler"}),
    "dspark_scheduler_profile_only": ("dspark", {"policy": "scheduler", "measured_costs": False}),
    "hybrid_scheduler": ("hybrid", {"policy": "scheduler"}),
}
# All engines first, then every method on each prompt back to back: this machine's speed drifts by tens of
# percent over minutes, so a method run after another on all prompts would be judged on a different machine.
engines = {
    method: build_engine(
        EngineConfig(proposer=proposer, verification=verification), model=model, tokenizer=tokenizer
    )
    for method, (proposer, verification) in METHODS.items()
}
rates: dict[str, list[float]] = {}
for i, prompt in enumerate(prompts):
    for label, sampling in SAMPLINGS.items():
        params = SamplingParams(max_tokens=128, ignore_eos=True, seed=i, **sampling)
        for method, engine in engines.items():
            ids = engine.encode_prompt(messages=[{"role": "user", "content": prompt.turns[0]}])
            began = time.perf_counter()
            tokens = sum(len(o.token_ids) for o in engine.stream(ids, params))
            rates.setdefault(f"{method}/{label}", []).append(tokens / (time.perf_counter() - began))
    print(f"prompt {i + 1}/{num_prompts}", flush=True)
medians = {key: round(statistics.median(values), 2) for key, values in rates.items()}
vs_plain = {
    key: round(
        statistics.median(r / p for r, p in zip(values, rates["plain/" + key.split("/")[1]], strict=True)), 3
    )
    for key, values in rates.items()
    if not key.startswith("plain/")
}
extra_ms = {  # what steps cost beyond the cost profile, per request, as the schedulers measured it
    method: engine.policy.costs.summary()
    for method, engine in engines.items()
    if isinstance(engine.policy, ScheduledVerification) and engine.policy.costs is not None
}
print("median tok/s", medians, "\nmedian per-prompt ratio to plain (same sampling)", vs_plain)
with open(out_path, "w") as f:
    json.dump({"num_prompts": num_prompts, "max_tokens": 128, "median_tokens_per_s": medians,
               "median_ratio_to_plain": vs_plain, "measured_extra_ms_per_request": extra_ms,
               "per_prompt": rates}, f, indent=1)  # fmt: skip
