"""Linear layers with the fastest CPU kernel for the number of rows.

A decode or verify step multiplies a few rows by every weight: memory-bound, so what matters is reading
each weight once at full bandwidth. Measured on the 2-core dev machine for SmolLM2-135M's 121 matmuls per
step (`dspark bench` cost curve, and the kernel test): `F.linear` ~43 ms for one row, oneDNN's packed
layout ~27 ms, the native small-M kernel (`dspark/kernels`) ~20 ms, and it stays ahead up to 16 rows.
Prefill chunks (many rows) are compute-bound and go to oneDNN. The dense weight stays the source of
truth (checkpoints, tied embeddings); the packed copy is derived, used only on CPU in fp32.

A weight that is exactly block-quantized (the GGUF default target's, dspark/models/quantized.py) is read
in its blocks by the block kernel instead, up to `quantized.MAX_ROWS` rows: the same products as the
small-M kernel bit for bit, from 4-5x fewer bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.kernels import small_m_linear
from dspark.models.quantized import MAX_ROWS as BLOCK_MAX_ROWS
from dspark.models.quantized import BlockQuantized, block_quantized

# Up to this many rows the native kernel beats oneDNN on the dev machine (see the module docstring).
SMALL_M_ROWS = 16


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self._small_m = None
        self._blocks: BlockQuantized | None = None

    def pack(self) -> None:
        """Choose CPU fp32 kernels (call again after the dense weight changes)."""
        self.unpack()
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return
        if onednn_packing_available():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        out_features, in_features = w.shape
        if in_features % 16 == 0 and out_features % 4 == 0 and w.is_contiguous():
            self._small_m = small_m_linear()
        if self._small_m is not None:
            self._blocks = block_quantized(w)

    @property
    def weight_format(self) -> str:
        """What the few-row kernel reads: a block format (q4_1, q8_0), f16, or fp32."""
        return "fp32" if self._blocks is None else self._blocks.kind

    def kernel_spec(self) -> tuple[int, list[torch.Tensor]]:
        """This layer for the native fused kernels (dspark/kernels/draft_ops.cpp): a kind (-1 any fp32 path,
        0 the fp32 few-row kernel, 1 fp16, 2 Q8_0, 3 Q4_1) and [fp32 weight, q, d, m] (empty where the format
        has none). They choose by rows as `forward` does."""
        empty = self.weight.new_empty(0)
        if self.bias is not None:
            raise ValueError("the fused kernels take linear layers without bias")
        if self._blocks is not None:
            kind = {"f16": 1, "q8_0": 2, "q4_1": 3}[self._blocks.kind]
            parts = (self._blocks.q, self._blocks.d, self._blocks.m)
            return kind, [self.weight, *(empty if p is None else p for p in parts)]
        return (0 if self._small_m is not None else -1), [self.weight, empty, empty, empty]

    def unpack(self) -> None:
        self._packed = None
        self._small_m = None
        self._blocks = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.dim() == 2 and not x.requires_grad:
            rows = x.shape[0]
            if self._blocks is not None and rows <= BLOCK_MAX_ROWS:
                y = self._blocks(x)
            elif self._small_m is not None and rows <= SMALL_M_ROWS:
                y = self._small_m(x, self.weight)
            elif self._packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
            else:
                return F.linear(x, self.weight, self.bias)
            return y if self.bias is None else y.add_(self.bias)
        return F.linear(x, self.weight, self.bias)
