"""Tensor parallelism for the target model over torch.distributed (gloo on CPU, NCCL on GPU).

Megatron-style: each rank keeps the attention heads of a contiguous range of KV-head groups (their q/k/v
rows and o_proj columns) and a range of the MLP's intermediate columns (gate/up rows, down_proj columns).
o_proj and down_proj then yield partial sums, all-reduced so every rank carries the full residual stream.
Ranks hold their own shard of the KV cache. Splits need not be even: SmolLM2-135M's 3 KV heads split 2 + 1
over two ranks.

Rank 0 (the leader) runs the engine. Before each forward it broadcasts the step's tokens and batch layout;
the other ranks (followers) run the same forward on their shards in lockstep and skip the LM head. Cache
lengths travel with the layout (a slot's length is where its new tokens start), so rollbacks and frees on
the leader need no messages.
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

from dspark.models.kv_cache import KVCache
from dspark.models.llama import BatchLayout, Transformer
from dspark.models.loader import load_transformer
from dspark.runtime import set_threads


class Command(IntEnum):
    STOP = 0
    NEW_CACHE = 1  # cache id, slots, max_len
    FORWARD = 2  # cache id, requests, tokens; then a payload of slots, starts, num_new, tokens
    DROP_CACHE = 3  # cache id


_HEADER = 4


def split_range(total: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share when `total` items split into `parts` near-equal contiguous ranges."""
    base, extra = divmod(total, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_transformer(model: Transformer, rank: int, world_size: int) -> Transformer:
    """Keep only `rank`'s heads and MLP columns (in place); the caller sets the layers' all_reduce."""
    cfg = model.cfg
    if cfg.num_kv_heads < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} exceeds the model's {cfg.num_kv_heads} KV heads")
    kv_lo, kv_hi = split_range(cfg.num_kv_heads, world_size, rank)
    mlp_lo, mlp_hi = split_range(cfg.intermediate_size, world_size, rank)
    group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q_rows = torch.arange(kv_lo * group * d, kv_hi * group * d)
    kv_rows = torch.arange(kv_lo * d, kv_hi * d)
    qkv_rows = torch.cat([q_rows, cfg.q_size + kv_rows, cfg.q_size + cfg.kv_size + kv_rows])
    mlp_rows = torch.arange(mlp_lo, mlp_hi)
    gate_up_rows = torch.cat([mlp_rows, cfg.intermediate_size + mlp_rows])
    local = cfg.model_copy(
        update={
            "num_heads": (kv_hi - kv_lo) * group,
            "num_kv_heads": kv_hi - kv_lo,
            "intermediate_size": mlp_hi - mlp_lo,
        }
    )
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        _keep(attn.wqkv, rows=qkv_rows)
        _keep(attn.wo, columns=q_rows)
        _keep(mlp.w_gate_up, rows=gate_up_rows)
        _keep(mlp.w_down, columns=mlp_rows)
        attn.cfg = local
    model.cfg = local
    return model


def _keep(linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            linear.bias.data = linear.bias.data.index_select(0, rows).contiguous()
    if columns is not None:
        weight = weight.index_select(1, columns)
    linear.weight.data = weight.contiguous()


def init_process_group(rank: int, world_size: int, init_method: str, backend: str = "gloo") -> None:
    """Join the tensor-parallel group (one per process); `init_method` is a tcp://host:port rendezvous."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(minutes=5)
    )


def load_shard(source: str, rank: int, world_size: int, pack: bool = True) -> Transformer:
    """Load the target, keep `rank`'s shard and wire its all-reduces (the process group must exist)."""
    model = shard_transformer(load_transformer(source, pack=False), rank, world_size)
    for layer in model.layers:
        layer.all_reduce = _all_reduce
    if pack:
        model.pack_weights()
    return model


def _all_reduce(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor)


def _broadcast_ints(values: list[int] | None, length: int, device: torch.device) -> torch.Tensor:
    buffer = (
        torch.tensor(values, dtype=torch.long, device=device)
        if values is not None
        else torch.empty(length, dtype=torch.long, device=device)
    )
    dist.broadcast(buffer, src=0)
    return buffer


class Leader:
    """Rank 0's mirror of new caches and forward inputs (installed as `model.tp_leader`)."""

    def __init__(self, model: Transformer) -> None:
        self.device = model.embed.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self._next_id = 0
        self._dropped: list[int] = []  # caches garbage-collected since the last command
        model.tp_leader = self

    def new_cache(self, cache: KVCache) -> None:
        cache_id = self._next_id
        self._next_id += 1
        cache.group_id = cache_id  # type: ignore[attr-defined]
        weakref.finalize(cache, self._dropped.append, cache_id)
        self._send([Command.NEW_CACHE, cache_id, cache.num_slots, cache.max_len])

    def forward(self, tokens: torch.Tensor, layout: BatchLayout, cache: KVCache) -> None:
        n = len(layout.slots)
        self._send([Command.FORWARD, cache.group_id, n, tokens.numel()])  # type: ignore[attr-defined]
        payload = [*layout.slots, *layout.starts, *layout.num_new, *tokens.tolist()]
        _broadcast_ints(payload, len(payload), self.device)

    def stop(self) -> None:
        self._send([Command.STOP, 0, 0, 0])

    def _send(self, header: list[int]) -> None:
        while self._dropped:
            _broadcast_ints([Command.DROP_CACHE, self._dropped.pop(), 0, 0], _HEADER, self.device)
        _broadcast_ints([int(v) for v in header], _HEADER, self.device)


def follow(model: Transformer) -> None:
    """Ranks > 0: run every forward the leader broadcasts, until it stops."""
    device = model.embed.device if dist.get_backend() == "nccl" else torch.device("cpu")
    caches: dict[int, KVCache] = {}
    no_logits = torch.empty(0, dtype=torch.long)
    while True:
        command, a, b, c = _broadcast_ints(None, _HEADER, device).tolist()
        if command == Command.STOP:
            return
        if command == Command.NEW_CACHE:
            caches[a] = model.new_cache(b, c)
        elif command == Command.DROP_CACHE:
            caches.pop(a, None)
        elif command == Command.FORWARD:
            ints = _broadcast_ints(None, 3 * b + c, device).cpu()
            slots, starts, num_new = (ints[i * b : (i + 1) * b].tolist() for i in range(3))
            cache = caches[a]
            for slot, start in zip(slots, starts, strict=True):
                cache.lengths[slot] = start
            tokens = ints[3 * b :].to(model.embed.device)
            model(tokens, model.layout(slots, starts, num_new), cache, no_logits)
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


def free_rendezvous(host: str = "127.0.0.1") -> str:
    """A tcp:// rendezvous on a free port of `host` (rank 0's node)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def run_follower(
    source: str, rank: int, world_size: int, init_method: str, num_threads: int | None = None
) -> None:
    """A follower process's whole life: join the group, load its shard, follow rank 0, leave."""
    set_threads(num_threads)
    init_process_group(rank, world_size, init_method)
    try:
        follow(load_shard(source, rank, world_size))
    finally:
        dist.destroy_process_group()


def start_leader(source: str, world_size: int, init_method: str) -> Transformer:
    """Rank 0: join the group and return its shard, wired to mirror every forward to the followers."""
    init_process_group(0, world_size, init_method)
    model = load_shard(source, 0, world_size)
    Leader(model)
    return model


def stop_leader(model: Transformer) -> None:
    """Release the followers and leave the group."""
    if model.tp_leader is not None:
        model.tp_leader.stop()  # type: ignore[attr-defined]
        model.tp_leader = None
    dist.destroy_process_group()
