"""Linear layers with an optional oneDNN-packed weight for CPU decoding.

On CPU, `F.linear` on a few rows is memory-bound and can pick slow kernels; oneDNN's blocked weight
layout cuts a SmolLM2 decode step's matmul time substantially. The dense weight is kept as the source of
truth (checkpoints, embedding tying); the packed copy is derived and only used on CPU in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Derive the oneDNN-packed weight; call again after the dense weight changes."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and onednn_packing_available():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        else:
            self._packed = None

    def unpack(self) -> None:
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.dtype == torch.float32 and not x.requires_grad:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
