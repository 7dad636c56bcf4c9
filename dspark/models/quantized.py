"""Weights read in the blocks they were quantized to, when that reproduces them exactly.

The default target ships as GGUF (Q4_1 layers, a Q8_0 embedding / LM head) and is dequantized once to fp32.
A decode step streams every weight once and is memory-bound, so reading 0.75 (Q4_1) or 1.13 (Q8_0) bytes
per weight instead of 4 is most of its time. This module recovers the blocks from the fp32 weights and
keeps them only when every weight rebuilds bit for bit (`d * q + m` with `d * q` exact in fp32, one
rounding, which the kernel's FMA also makes): the products, and so the greedy output, stay exactly the fp32
model's. Weights that are all fp16 values (a drafter checkpoint stored in fp16) are kept as fp16 the same
way. A weight that is none of these (any other checkpoint) fails the checks and stays fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from dspark.kernels import native_ops

BLOCK = 32  # weights per block in both GGUF formats
DISABLE_ENV = "DSPARK_BLOCK_QUANT"  # "0": never use block-quantized weights (A/B measurements)
# Rows of x up to which the block kernel is used. It rebuilds each group of 4 weight rows once per call and
# multiplies it by every row of x with the fp32 kernel's micro-kernel; summed over SmolLM2-135M's 121 matmuls
# on the 2-core dev machine (A/B in one run, ms): 16 rows 54 (fp32 small-M kernel 73, oneDNN 96), 32 rows 85
# (95, 111), 64 rows 169 (190, 194), 96 rows 257 (260, 274). Past that, prefill chunks go to oneDNN, whose
# cache blocking wins on long chunks.
MAX_ROWS = 64


@dataclass(frozen=True)
class BlockQuantized:
    """One linear layer's weight [N, K] as blocks: w = d * q (+ m for Q4_1), per row and block of 32; or
    fp16 (`q` the weight itself, no scales)."""

    kind: Literal["q4_1", "q8_0", "f16"]
    # q4_1: [N, K/2] uint8, 16 bytes per block, byte j = weight j | weight j + 16 << 4; q8_0: [N, K] int8;
    # f16: [N, K] fp16
    q: torch.Tensor
    d: torch.Tensor | None = None  # [N, K/32] fp32 (q4_1, q8_0)
    m: torch.Tensor | None = None  # [N, K/32] fp32 (q4_1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ops = native_ops()
        if self.kind == "q4_1":
            return ops.q4_1_linear(x, self.q, self.d, self.m)
        if self.kind == "q8_0":
            return ops.q8_0_linear(x, self.q, self.d)
        return ops.f16_linear(x, self.q)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for (what the kernel rebuilds)."""
        if self.kind == "f16":
            return self.q.float()
        n = self.d.shape[0]
        if self.kind == "q4_1":
            packed = self.q.view(n, -1, BLOCK // 2)
            q = torch.cat((packed & 0xF, packed >> 4), dim=-1).float()
            return torch.addcmul(self.m[..., None], self.d[..., None], q).reshape(n, -1)
        return (self.d[..., None] * self.q.view(n, -1, BLOCK).float()).reshape(n, -1)


def block_quantized(weight: torch.Tensor) -> BlockQuantized | None:
    """The exact compact form of `weight` (Q4_1 tried first, then Q8_0, then fp16), or None."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or native_ops() is None:
        return None
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or w.shape[0] % 4:
        return None
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    return _q4_1(blocks) or _q8_0(blocks) or _f16(w)


# fp16 neighbours tried for a block's scale, nearest first: the stored scale is the fp16 rounding of a
# value that the dequantized block only lets us estimate to within rounding.
_SCALE_STEPS = (0, 1, -1, 2, -2)


def _q4_1(blocks: torch.Tensor) -> BlockQuantized | None:
    lo = blocks.amin(-1)
    estimate = ((blocks.amax(-1) - lo) / 15).half()
    d = torch.zeros_like(lo)
    solved = torch.zeros_like(lo, dtype=torch.bool)
    for step in _SCALE_STEPS:
        todo = ~solved
        if not todo.any():
            break
        cand = _fp16_step(estimate[todo], step)
        b, m = blocks[todo], lo[todo]
        q = _levels(b - m[:, None], cand, 0, 15)
        ok = (torch.addcmul(m[:, None], cand[:, None], q) == b).all(-1)
        d[todo] = torch.where(ok, cand, d[todo])
        solved[todo] = ok
    if not solved.all():
        return None
    q = _levels(blocks - lo[..., None], d, 0, 15).to(torch.uint8)
    packed = (q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)).reshape(blocks.shape[0], -1)
    return BlockQuantized("q4_1", packed.contiguous(), d.contiguous(), lo.contiguous())


def _q8_0(blocks: torch.Tensor) -> BlockQuantized | None:
    d = blocks.abs().amax(-1) / 127  # exact: the largest weight is d * +-127
    q = _levels(blocks, d, -127, 127)
    if not (d[..., None] * q == blocks).all():
        return None
    q8 = q.to(torch.int8).reshape(blocks.shape[0], -1).contiguous()
    return BlockQuantized("q8_0", q8, d.contiguous(), None)


def _f16(w: torch.Tensor) -> BlockQuantized | None:
    half = w.half()
    return BlockQuantized("f16", half.contiguous()) if torch.equal(half.float(), w) else None


def _levels(offsets: torch.Tensor, d: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """round(offsets / d) per block, clamped to the format's levels (0 where d is 0)."""
    scale = torch.where(d > 0, d, torch.ones_like(d))[..., None]
    return torch.where(d[..., None] > 0, (offsets / scale).round(), 0.0).clamp_(low, high)


def _fp16_step(values: torch.Tensor, step: int) -> torch.Tensor:
    """fp16 `values` moved by `step` units in the last place (non-negative values), as fp32."""
    if step == 0:
        return values.float()
    bits = values.view(torch.int16).to(torch.int32) + step
    return bits.clamp_(0, 0x7BFF).to(torch.int16).view(torch.float16).float()
