"""Prompt-prefix KV reuse: exact chains of blocks, LRU bounds, and greedy output still the target's own."""

from __future__ import annotations

import pytest
import torch

from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from dspark.models.kv_cache import KVCache
from dspark.proposers import DraftRequest, TargetObserver
from dspark.sampling import SamplingParams

B = BLOCK_TOKENS


def filled_cache(prompt_len: int) -> KVCache:
    """A small cache whose slot 0 holds random keys/values for `prompt_len` positions."""
    cache = KVCache(num_layers=2, num_slots=3, max_len=4 * B, num_kv_heads=2, head_dim=8)
    keys, values = torch.randn(2, 2, 2, prompt_len, 8).unbind(0)
    assert cache.allocate() == 0
    cache.write_positions(0, 0, keys, values)
    return cache


def test_the_longest_exact_chain_of_blocks_is_copied():
    prompt = list(range(100, 100 + 2 * B + 5))
    cache, prefixes = filled_cache(len(prompt)), PrefixCache(max_blocks=8)
    prefixes.store(cache, 0, prompt, cached=len(prompt))
    assert len(prefixes) == 2  # the partial third block is not kept

    slot = cache.allocate()
    assert prefixes.load(cache, slot, prompt, limit=len(prompt) - 1) == 2 * B
    assert cache.lengths[slot] == 2 * B
    assert torch.equal(cache.k[:, slot, :, : 2 * B], cache.k[:, 0, :, : 2 * B])
    assert torch.equal(cache.v[:, slot, :, : 2 * B], cache.v[:, 0, :, : 2 * B])
    assert prefixes.hit_tokens == 2 * B


@pytest.mark.parametrize(
    ("change_at", "limit", "expected"),
    [
        (B + 3, None, B),  # the second block differs: only the first is reused
        (2, None, 0),  # the first differs: the second, though equal, is not reachable (its prefix differs)
        (None, B - 1, 0),  # the prompt must keep its last token to compute
        (None, 2 * B - 1, B),
    ],
)
def test_reuse_stops_at_the_first_different_block_and_at_the_limit(change_at, limit, expected):
    prompt = list(range(100, 100 + 2 * B + 5))
    cache, prefixes = filled_cache(len(prompt)), PrefixCache(max_blocks=8)
    prefixes.store(cache, 0, prompt, cached=len(prompt))
    other = list(prompt)
    if change_at is not None:
        other[change_at] += 1
    slot = cache.allocate()
    assert prefixes.load(cache, slot, other, limit=limit or len(other) - 1) == expected
    assert cache.lengths[slot] == expected


def test_least_recently_used_blocks_go_first():
    prompts = [[i] * B for i in range(3)]
    cache, prefixes = filled_cache(B), PrefixCache(max_blocks=2)
    for p in prompts:
        prefixes.store(cache, 0, p, cached=B)
    assert len(prefixes) == 2
    slot = cache.allocate()
    assert prefixes.load(cache, slot, prompts[0] + [7], limit=B) == 0  # evicted
    assert prefixes.load(cache, slot, prompts[2] + [7], limit=B) == B


# ---- in the engine ----------------------------------------------------------------------------------------


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=n)  # fmt: skip
    return out[0, x.shape[1] :].tolist()


def test_reused_prefixes_keep_greedy_output_the_targets_own(
    default_model, tokenizer, hf_model, dev_prompts, to_chat_ids
):
    """One request at a time, so each later prompt reuses the shared system turn; a second turn of the first
    conversation reuses its prompt and the reply the engine generated."""
    engine = build_engine(
        EngineConfig(proposer="ngram", max_batch_size=1), model=default_model, tokenizer=tokenizer
    )
    first = [{"role": "user", "content": dev_prompts[0]}]
    first_ids = to_chat_ids(dev_prompts[0])
    reply = engine.generate([first_ids], SamplingParams(max_tokens=24))[0].text
    conversation = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    second_turn = list(
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    )  # fmt: skip
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    others = [to_chat_ids(dev_prompts[5]), to_chat_ids(dev_prompts[9])]
    hits = engine.prefix_cache.hit_tokens
    got = [c.token_ids for c in engine.generate(others, params)]
    assert engine.prefix_cache.hit_tokens - hits >= 2 * B  # the system turn, at least
    hits = engine.prefix_cache.hit_tokens
    got += [c.token_ids for c in engine.generate([second_turn], params)]
    assert engine.prefix_cache.hit_tokens - hits > len(first_ids)  # into the reply
    assert got == [_hf_greedy(hf_model, p, 24) for p in [*others, second_turn]]


class _Recorder(TargetObserver):
    hidden_layers = (3,)

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        pass

    def release(self, request: DraftRequest) -> None:
        pass


def test_no_reuse_when_an_observer_must_see_every_prompt_row(default_model, tokenizer):
    config = EngineConfig(proposer="none", max_batch_size=1)
    assert build_engine(config, model=default_model, tokenizer=tokenizer).prefix_cache is not None
    observed = build_engine(config, model=default_model, tokenizer=tokenizer, observers=[_Recorder()])
    assert observed.prefix_cache is None
    off = EngineConfig(proposer="none", max_batch_size=1, prefix_cache_mib=0)
    assert build_engine(off, model=default_model, tokenizer=tokenizer).prefix_cache is None
    small = EngineConfig(proposer="none", max_batch_size=1, prefix_cache_mib=1)
    engine = build_engine(small, model=default_model, tokenizer=tokenizer)
    block_bytes = engine.cache.bytes_per_position * B  # 30 layers x 3 KV heads x 64 x 2 x fp32 x 16
    assert block_bytes == 2 * 30 * 3 * 64 * 4 * B and engine.prefix_cache.max_blocks == 2**20 // block_bytes
