"""Tensor parallelism: two gloo ranks (this process and a spawned follower) produce TP=1's greedy tokens."""

from __future__ import annotations

import itertools
import multiprocessing

import pytest
import torch

from dspark.assembly import build_engine
from dspark.distributed.tensor_parallel import (
    free_rendezvous,
    run_follower,
    shard_transformer,
    split_range,
    start_leader,
    stop_leader,
)
from dspark.engine import Engine, EngineConfig
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig


@pytest.mark.parametrize(("total", "parts"), [(3, 2), (1536, 2), (9, 4), (5, 5)])
def test_split_range_covers_everything_once(total, parts):
    ranges = [split_range(total, parts, r) for r in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_more_ranks_than_kv_heads_is_refused(default_model):
    with pytest.raises(ValueError, match="KV heads"):  # raised before anything is sliced
        shard_transformer(default_model, 0, default_model.cfg.num_kv_heads + 1)
    assert default_model.cfg.num_kv_heads == 3


PROMPTS = ["Write a haiku about autumn leaves.", "List three prime numbers and explain why they are prime."]


def _greedy(engine: Engine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=40)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [engine.add_request(messages=m, params=params) for m in messages]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    for out in engine.run_until_done():
        tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def test_two_ranks_match_one(default_model, tokenizer):
    config = EngineConfig(
        max_batch_size=4,
        max_model_len=512,
        proposer="ngram",
        num_speculative_tokens=4,
        verification=VerificationConfig(policy="fixed"),
    )
    expected = _greedy(build_engine(config, model=default_model, tokenizer=tokenizer))

    init_method = free_rendezvous()
    ctx = multiprocessing.get_context("spawn")
    follower = ctx.Process(target=run_follower, args=("default", 1, 2, init_method, 1), daemon=True)
    follower.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rank
    try:
        leader = start_leader("default", 2, init_method)
        assert leader.cfg.num_kv_heads == 2 and leader.cfg.intermediate_size == 768  # 3 KV heads: 2 + 1
        try:
            # Logits of a prompt agree with the unsharded model's (summation order differs: allclose).
            ids = torch.tensor(tokenizer.encode(PROMPTS[0]))
            got, want = (
                m(ids, m.layout([0], [0], [len(ids)]), m.new_cache(1, 64), torch.arange(len(ids))).logits
                for m in (leader, default_model)
            )
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
            assert _greedy(build_engine(config, model=leader, tokenizer=tokenizer)) == expected
        finally:
            stop_leader(leader)
        follower.join(timeout=60)
        assert follower.exitcode == 0
    finally:
        torch.set_num_threads(threads)
        if follower.is_alive():
            follower.kill()
