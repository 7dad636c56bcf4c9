"""Reuse of prompt-prefix KV across requests (what vLLM calls automatic prefix caching).

Chat prompts share long prefixes: every SmolLM2 chat prompt starts with the same ~20-token system turn, and a
multi-turn conversation resends all earlier turns. Prefill is compute-bound on a CPU (~400 tokens/s here), so
recomputing those positions is pure waste.

The cache keeps the KV of prompt positions (while a prompt is prefilled) and of prompt and output positions
(when a request ends: a conversation's next turn resends the reply) in blocks of `BLOCK_TOKENS`, keyed by (the
id of the block before it, the block's tokens): a block is only reachable through the exact chain of tokens
before it, so a match is exact, with no hash collisions to worry about. A prompt starting its prefill gets
the longest chain of cached blocks over it copied into its slot and skips their prefill. Least recently used
blocks are dropped beyond `max_blocks`; a child of a dropped block becomes unreachable and ages out the same
way.

The reused KV was computed in another request's prefill chunk, so it can differ from what this request would
have computed in its own chunk by float rounding (kernels sum differently at different row counts), exactly as
batching already varies it. Observers (a DSpark drafter reads the target's hidden states of every prompt row)
would miss the skipped rows, so the engine does not use the cache when any observer is attached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

import torch

from dspark.models.kv_cache import KVCache

BLOCK_TOKENS = 16  # vLLM's default block size; the shared SmolLM2 system turn fills one block


@dataclass
class _Block:
    id: int
    keys: torch.Tensor  # [layers, kv_heads, BLOCK_TOKENS, head_dim]
    values: torch.Tensor


def _key(parent: int, tokens: list[int], end: int) -> tuple[int, tuple[int, ...]]:
    """The key of the block of tokens[end - BLOCK_TOKENS : end] that follows block `parent`."""
    return parent, tuple(tokens[end - BLOCK_TOKENS : end])


class PrefixCache:
    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("a prefix cache needs room for at least one block")
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = count(1)  # 0 is the root: "no block before"
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, reused from the cache

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block (benchmarks: each run starts cold)."""
        self._blocks.clear()

    def load(self, cache: KVCache, slot: int, prompt: list[int], limit: int) -> int:
        """Copy the longest cached prefix of prompt[:limit] into an empty slot; returns its length (a multiple
        of BLOCK_TOKENS, 0 on a miss)."""
        self.queried_tokens += len(prompt)
        found, parent = [], 0
        for end in range(BLOCK_TOKENS, limit + 1, BLOCK_TOKENS):
            key = _key(parent, prompt, end)
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
            parent = block.id
        for i, block in enumerate(found):
            cache.write_positions(slot, i * BLOCK_TOKENS, block.keys, block.values)
        reused = len(found) * BLOCK_TOKENS
        self.hit_tokens += reused
        return reused

    def store(self, cache: KVCache, slot: int, tokens: list[int], cached: int) -> None:
        """Keep the complete blocks of tokens[:cached] (positions already in the slot) not kept yet: a prompt
        while it is prefilled, prompt and output when the request ends."""
        parent = 0
        for end in range(BLOCK_TOKENS, min(cached, len(tokens)) + 1, BLOCK_TOKENS):
            key = _key(parent, tokens, end)
            block = self._blocks.get(key)
            if block is None:
                keys, values = cache.read_positions(slot, end - BLOCK_TOKENS, end)
                block = self._blocks[key] = _Block(next(self._ids), keys, values)
                while len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(key)
            parent = block.id
