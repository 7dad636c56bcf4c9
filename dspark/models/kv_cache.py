"""Preallocated KV cache with one slot per running request.

Each slot holds up to `max_len` positions. A slot's length is the number of valid cached positions;
rolling back rejected draft tokens is O(1): the length moves back and later writes overwrite the rest.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer lists of per-slot views [kv_heads, max_len, head_dim], made once: indexing the 5-D
        # tensor on every layer of every step costs more than the decode-step attention itself.
        self.k_slots = [list(layer.unbind(0)) for layer in self.k]
        self.v_slots = [list(layer.unbind(0)) for layer in self.v]
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def bytes_per_position(self) -> int:
        """Keys and values of one position over all layers."""
        layers, _, kv_heads, _, head_dim = self.k.shape
        return 2 * layers * kv_heads * head_dim * self.k.element_size()

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def rollback(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} back to {length} (has {self.lengths[slot]})")
        self.lengths[slot] = length

    def copy_slot(self, source: int, target: int) -> None:
        """Give `target` the cached positions of `source` (requests sharing a context, e.g. profiling)."""
        n = self.lengths[source]
        self.k[:, target, :, :n] = self.k[:, source, :, :n]
        self.v[:, target, :, :n] = self.v[:, source, :, :n]
        self.lengths[target] = n

    def read_positions(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of cached positions [start, end): [layers, kv_heads, n, head_dim]."""
        if not 0 <= start <= end <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, not [{start}, {end})")
        return self.k[:, slot, :, start:end].clone(), self.v[:, slot, :, start:end].clone()

    def write_positions(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append keys/values [layers, kv_heads, n, head_dim] at `start`, the slot's current length."""
        if start != self.lengths[slot] or start + keys.shape[2] > self.max_len:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions: cannot write at {start}")
        end = start + keys.shape[2]
        self.k[:, slot, :, start:end] = keys
        self.v[:, slot, :, start:end] = values
        self.lengths[slot] = end
