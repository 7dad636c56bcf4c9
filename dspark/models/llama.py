"""A lean Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a ragged batch.

One forward call processes a *ragged* batch: request i appends `num_new[i]` tokens to its KV-cache slot
(1 for plain decoding, 1 + draft length for verification, a chunk of the prompt for prefill). Matmuls run
over all tokens of the batch at once; attention runs per request against its own slot.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dspark.kernels import native_ops
from dspark.models.config import ModelConfig
from dspark.models.kv_cache import KVCache
from dspark.models.linear import Linear
from dspark.models.rope import apply_rope, inverse_frequencies, rope_tables

_EMPTY_ROWS = torch.empty(0, dtype=torch.long)


class TensorParallelLeader(Protocol):
    """Rank 0's side of tensor parallelism (dspark.distributed.tensor_parallel)."""

    def new_cache(self, cache: KVCache) -> None: ...

    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: KVCache) -> None: ...


@dataclass
class BatchLayout:
    """Which slot each request writes to, where its new tokens start, and how many there are."""

    slots: list[int]
    starts: list[int]
    num_new: list[int]
    positions: torch.Tensor = field(init=False)
    masks: list[torch.Tensor | None] = field(init=False)

    # Requests feeding few tokens (decode, verification) share one native attention call; prompt chunks
    # go one by one. short_table: their (slot, start, n) rows; short_rows: their token rows.
    short: list[int] = field(init=False)
    short_table: torch.Tensor = field(init=False)
    short_rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.positions = torch.cat(
            [torch.arange(s, s + n) for s, n in zip(self.starts, self.num_new, strict=True)]
        )
        self.masks = [None] * len(self.slots)  # filled per model: they depend on the GQA group size
        # Several short blocks, or one of 2+ tokens (a batch-1 verify step: 7% faster forwards of 2-8 tokens
        # than bmm on the dev machine), use the native call; batch-1 decode skips this bookkeeping.
        short = [i for i, n in enumerate(self.num_new) if n <= _SHORT_BLOCK_TOKENS]
        self.short = short if len(short) > 1 or (short and self.num_new[short[0]] > 1) else []
        self.short_table = torch.tensor(
            [(self.slots[i], self.starts[i], self.num_new[i]) for i in self.short]
        )
        self.short_rows = _EMPTY_ROWS
        if self.short and len(self.short) < len(self.slots):  # a mixed step gathers its short rows
            offsets = [0, *itertools.accumulate(self.num_new)]
            self.short_rows = torch.tensor([r for i in self.short for r in range(offsets[i], offsets[i + 1])])

    @property
    def all_short(self) -> bool:
        return bool(self.short) and len(self.short) == len(self.slots)


def _block_causal_bias(start: int, n: int, group: int) -> torch.Tensor | None:
    """Additive mask for `group` stacked query heads of `n` new tokens over `start + n` keys.

    None when n == 1: a single new token sees the whole slot.
    """
    if n == 1:
        return None
    query_pos = torch.arange(start, start + n).repeat(group)
    visible = torch.arange(start + n)[None, :] <= query_pos[:, None]
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


# Decode and verification blocks up to this long go through the native ragged-attention kernel in one call.
_SHORT_BLOCK_TOKENS = 32
# Up to this many new tokens per request, explicit matmul attention beats SDPA's CPU dispatch overhead;
# above it (long prefill chunks) SDPA's blocked kernel keeps memory bounded.
_SMALL_QUERY_TOKENS = 64
_UNUSED = torch.empty(())  # baddbmm's ignored input when beta == 0
# Rows up to which the native RMSNorm (one call) beats F.rms_norm's several dispatched ops.
_NATIVE_NORM_ROWS = 64


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, native: ModuleType | None = None
) -> torch.Tensor:
    if native is not None and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= _NATIVE_NORM_ROWS:
        return native.rms_norm_rows(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q: [kv_heads, rows, d]; k, v: [kv_heads, keys, d]."""
    scale = q.shape[-1] ** -0.5
    if q.shape[1] > _SMALL_QUERY_TOKENS:
        mask = None if bias is None else bias == 0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.baddbmm(
        bias if bias is not None else _UNUSED,
        q,
        k.transpose(1, 2),
        beta=1.0 if bias is not None else 0.0,
        alpha=scale,
    )
    return torch.bmm(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wqkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.wo = Linear(cfg.q_size, cfg.hidden_size)
        self.native = None  # compiled CPU kernels, set by Transformer.pack_weights
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim), requires_grad=False)
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        cfg = self.cfg
        T, H, Hkv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.wqkv(x)
        qk = qkv[:, : cfg.q_size + cfg.kv_size].view(T, H + Hkv, d)
        if cfg.qk_norm:
            qk = torch.cat(
                (
                    F.rms_norm(qk[:, :H], (d,), self.q_norm, cfg.rms_norm_eps),
                    F.rms_norm(qk[:, H:], (d,), self.k_norm, cfg.rms_norm_eps),
                ),
                dim=1,
            )
        qk = apply_rope(qk, cos, sin)  # queries and keys in one pass
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(T, Hkv, d)
        group = H // Hkv
        k_slots, v_slots = cache.k_slots[layer], cache.v_slots[layer]
        native = self.native is not None and x.dtype == torch.float32 and bool(layout.short)
        if native and layout.all_short:  # decode / verification steps: one call for the whole batch
            out = self.native.ragged_attention(q, k, v, cache.k[layer], cache.v[layer], layout.short_table)
            return self.wo(out.view(T, H * d))
        if len(layout.slots) == 1:  # the batch-1 decode hot path: no gather buffer
            slot, start, mask = layout.slots[0], layout.starts[0], layout.masks[0]
            out = self._attend_one(q, k, v, start, mask, k_slots[slot], v_slots[slot])
            return self.wo(out.reshape(T, H * d))
        out = torch.empty(T, Hkv, group, d, dtype=x.dtype)
        if native:  # a mixed step: the short blocks in one call, the prompt chunks below
            rows = layout.short_rows
            out.view(T, H, d)[rows] = self.native.ragged_attention(
                q[rows], k[rows], v[rows], cache.k[layer], cache.v[layer], layout.short_table
            )
        done = set(layout.short) if native else set()
        offset = 0
        for i, (slot, start, n, mask) in enumerate(
            zip(layout.slots, layout.starts, layout.num_new, layout.masks, strict=True)
        ):
            rows = slice(offset, offset + n)
            if i not in done:
                out[rows] = self._attend_one(
                    q[rows], k[rows], v[rows], start, mask, k_slots[slot], v_slots[slot]
                )
            offset += n
        return self.wo(out.view(T, H * d))

    def _attend_one(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        k_slot: torch.Tensor,
        v_slot: torch.Tensor,
    ) -> torch.Tensor:
        """Append one request's keys/values to its slot and attend; returns [n, kv_heads, group, d]."""
        n, Hkv, d = k.shape
        group = q.shape[1] // Hkv
        end = start + n
        k_slot[:, start:end] = k.transpose(0, 1)
        v_slot[:, start:end] = v.transpose(0, 1)
        if start == 0 and n > _SMALL_QUERY_TOKENS:  # a whole prompt: SDPA's causal kernel skips masked blocks
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k_slot[None, :, :n],
                v_slot[None, :, :n],
                is_causal=True,
                enable_gqa=True,
            )
            return out[0].transpose(0, 1).reshape(n, Hkv, group, d)
        # Stack the query heads sharing a KV head as extra query rows: GQA without repeating K/V.
        if n == 1:
            q = q.view(Hkv, group, d)
        else:
            q = q.view(n, Hkv, group, d).permute(1, 2, 0, 3).reshape(Hkv, group * n, d)
        if self.native is not None and q.dtype == torch.float32 and n == 1:  # measured: bmm wins for n > 1
            out = self.native.block_attention(q, k_slot, v_slot, start, n)
        else:
            out = _attend(q, k_slot[:, :end], v_slot[:, :end], mask)
        if n == 1:
            return out.view(1, Hkv, group, d)
        return out.view(Hkv, group, n, d).permute(2, 0, 1, 3)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.mlp_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.native = None
        # Tensor parallelism: o_proj and down_proj outputs are partial sums over this rank's heads / columns;
        # `all_reduce` (in place) completes them so every rank carries the full residual stream.
        self.all_reduce: Callable[[torch.Tensor], None] | None = None

    def forward(self, x, cos, sin, layout, cache, layer: int) -> torch.Tensor:
        attn = self.attn(rms_norm(x, self.attn_norm, self.eps, self.native), cos, sin, layout, cache, layer)
        if self.all_reduce is not None:
            self.all_reduce(attn)
        h = x + attn
        mlp = self.mlp(rms_norm(h, self.mlp_norm, self.eps, self.native))
        if self.all_reduce is not None:
            self.all_reduce(mlp)
        return h + mlp


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [len(logit_rows), vocab]
    hidden: dict[int, torch.Tensor]  # layer index -> [num_tokens, hidden] output of that decoder layer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.native = None
        # Set on rank 0 of a tensor-parallel group: mirrors new caches and forward inputs to the other ranks.
        self.tp_leader: TensorParallelLeader | None = None
        cos, sin = self.rope_buffers(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def rope_buffers(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return rope_tables(inv_freq, cfg.max_position_embeddings)

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        cfg = self.cfg
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's {cfg.max_position_embeddings} positions")
        cache = KVCache(
            cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, self.embed.dtype,
            self.embed.device,
        )  # fmt: skip
        if self.tp_leader is not None:
            self.tp_leader.new_cache(cache)
        return cache

    def pack_weights(self) -> None:
        """Switch to the fastest CPU kernels: packed / native matmuls, native norm and decode attention."""
        native = native_ops() if self.embed.device.type == "cpu" else None
        self.native = native
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
            elif isinstance(module, (Attention, DecoderLayer)):
                module.native = native

    def layout(self, slots: Sequence[int], starts: Sequence[int], num_new: Sequence[int]) -> BatchLayout:
        layout = BatchLayout(list(slots), list(starts), list(num_new))
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        layout.masks = [
            _block_causal_bias(s, n, group) for s, n in zip(layout.starts, layout.num_new, strict=True)
        ]
        return layout

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache,
        logit_rows: torch.Tensor | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> ForwardOutput:
        """Append `tokens` (flattened in request order) to their slots; return logits of `logit_rows`.

        `logit_rows` indexes the flattened tokens (None: all rows). Slot lengths advance by `num_new`;
        the caller rolls back rejected positions with `cache.rollback`.
        """
        for slot, start, n in zip(layout.slots, layout.starts, layout.num_new, strict=True):
            if cache.lengths[slot] != start:
                raise ValueError(
                    f"slot {slot} holds {cache.lengths[slot]} positions, batch starts at {start}"
                )
            if start + n > cache.max_len:
                raise ValueError(f"slot {slot} would exceed the cache length {cache.max_len}")
        if self.tp_leader is not None:
            self.tp_leader.forward(tokens, layout, cache)
        cos, sin = self.rope_cos[layout.positions, None], self.rope_sin[layout.positions, None]
        x = F.embedding(tokens, self.embed)
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, layout, cache, i)
            if i in hidden_layers:
                hidden[i] = x
        for slot, start, n in zip(layout.slots, layout.starts, layout.num_new, strict=True):
            cache.lengths[slot] = start + n
        if logit_rows is not None:
            if logit_rows.numel() == 0:  # tensor-parallel followers: rank 0 computes the logits
                return ForwardOutput(logits=x.new_empty(0, self.cfg.vocab_size), hidden=hidden)
            x = x.index_select(0, logit_rows)
        logits = self.lm_head(rms_norm(x, self.norm, self.cfg.rms_norm_eps, self.native))
        return ForwardOutput(logits=logits, hidden=hidden)
