"""Block-quantized weights (dspark/models/quantized.py and the kernels): recovered only when exact, and the
kernel's products equal the fp32 kernel's bit for bit.

The reference blocks are made the way llama.cpp's quantizers make them (ggml's quantize_row_q4_1 /
quantize_row_q8_0, re-implemented here from the format description) and dequantized the way GGUF readers do
(fp16 scale and minimum widened to fp32, then d * q + m)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels import native_ops, small_m_linear
from dspark.models.linear import Linear
from dspark.models.quantized import DISABLE_ENV, MAX_ROWS, block_quantized

needs_kernel = pytest.mark.skipif(native_ops() is None, reason="native kernels unavailable on this machine")


def ggml_q4_1(x: torch.Tensor) -> torch.Tensor:
    """Quantize rows of x in blocks of 32 as Q4_1 and return the dequantized fp32 weights."""
    b = x.reshape(x.shape[0], -1, 32)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((b - lo) * inv + 0.5).floor().clamp(0, 15)  # C's (int)(v + 0.5f) for v >= 0, capped at 15
    d16, m16 = d.half().float(), lo.half().float()
    return (d16 * q + m16).reshape(x.shape)


def ggml_q8_0(x: torch.Tensor) -> torch.Tensor:
    b = x.reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (b * inv).round()
    return (d.half().float() * q).reshape(x.shape)


def fp16_values(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


FORMATS = [("q4_1", ggml_q4_1), ("q8_0", ggml_q8_0), ("f16", fp16_values)]  # each with its quantizer


@needs_kernel
@pytest.mark.parametrize(("kind", "quantize"), FORMATS)
@pytest.mark.parametrize(("out_features", "in_features"), [(4, 32), (192, 576), (576, 1536)])
def test_recovered_blocks_rebuild_the_weight_and_its_products_exactly(
    kind, quantize, out_features, in_features
):
    gen = torch.Generator().manual_seed(out_features + in_features)
    w = quantize(torch.randn(out_features, in_features, generator=gen) * 0.05)
    w[0, :32] = 0.0  # a constant block: scale 0
    blocks = block_quantized(w)
    assert blocks is not None and blocks.kind == kind
    assert torch.equal(blocks.dequantize(), w)
    fp32 = small_m_linear()
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 41, MAX_ROWS):  # each of the in-register shapes
        x = torch.randn(rows, in_features, generator=gen)
        y = blocks(x)
        assert torch.equal(y, fp32(x, w)), f"{rows} rows: not the fp32 kernel's products"
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_weights_that_are_not_block_quantized_stay_fp32(monkeypatch):
    w = torch.randn(64, 96)
    assert block_quantized(w) is None  # neither blocks nor fp16 values
    assert block_quantized(ggml_q4_1(w)[:, :80]) is None  # K not a multiple of 32
    assert block_quantized(ggml_q4_1(w).double()) is None
    assert block_quantized(ggml_q4_1(w)[:62]) is None  # N not a multiple of 4
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert block_quantized(ggml_q4_1(w)) is None


@needs_kernel
def test_linear_layer_uses_the_blocks_up_to_max_rows_and_rows_do_not_interact():
    layer = Linear(96, 64)
    layer.weight.data = ggml_q4_1(torch.randn(64, 96))
    layer.pack()
    assert layer.weight_format == "q4_1"
    x = torch.randn(MAX_ROWS + 36, 96)
    alone = torch.cat([layer._blocks(row[None]) for row in x])
    for rows in (1, 3, 4, 7, 8, 9, 16, 17, MAX_ROWS):
        # each row's output is the one it gets alone: a verify step sees the logits a decode step would
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows
    for rows in (MAX_ROWS + 1, MAX_ROWS + 36):  # prefill chunks: oneDNN
        torch.testing.assert_close(layer(x[:rows]), F.linear(x[:rows], layer.weight), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_the_default_target_is_read_in_its_gguf_blocks(default_model):
    """SmolLM2-135M's GGUF: every layer weight is Q4_1, the tied embedding / LM head Q8_0."""
    kinds = {name: m.weight_format for name, m in default_model.named_modules() if isinstance(m, Linear)}
    assert kinds.pop("lm_head") == "q8_0"
    assert set(kinds.values()) == {"q4_1"}, kinds


@needs_kernel
def test_the_shipped_drafter_reads_fp16_weights_and_the_targets_q8_rows(default_model):
    from dspark.drafters.dspark.checkpoint import load_drafter, resolve_drafter_dir

    drafter = load_drafter(resolve_drafter_dir("default"), default_model)
    drafter.pack_for_inference()
    kinds = {name: m.weight_format for name, m in drafter.named_modules() if isinstance(m, Linear)}
    assert kinds.pop("lm_head") == "q8_0"  # the target's LM head rows at the draft ids
    assert set(kinds.values()) <= {"f16", "fp32"} and list(kinds.values()).count("f16") >= 6, kinds


def _avx512_available() -> bool:
    ops = native_ops()
    if ops is None:
        return False
    was = ops.set_avx512(True)
    try:
        return ops.avx512_enabled()
    finally:
        ops.set_avx512(was)


@pytest.mark.skipif(not _avx512_available(), reason="the CPU lacks AVX-512")
@pytest.mark.parametrize(("kind", "quantize"), FORMATS)
def test_the_avx512_paths_give_the_avx2_paths_bits(kind, quantize):
    """One 16-lane register per chain on AVX-512, two 8-lane ones on AVX2, the same FMAs in the same order:
    the same bits for every row count (in registers up to 8 rows, through the scratch past it), in the block
    kernels and the fp32 kernel alike."""
    ops = native_ops()
    gen = torch.Generator().manual_seed(7)
    w = quantize(torch.randn(192, 576, generator=gen) * 0.05)
    blocks = block_quantized(w)
    assert blocks is not None and blocks.kind == kind
    was = ops.set_avx512(True)
    try:
        for rows in [*range(1, 26), 41, MAX_ROWS]:
            x = torch.randn(rows, 576, generator=gen)
            wide = (blocks(x), ops.small_m_linear(x, w))
            ops.set_avx512(False)
            narrow = (blocks(x), ops.small_m_linear(x, w))
            ops.set_avx512(True)
            assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1]), rows
            torch.testing.assert_close(wide[0], F.linear(x, w), rtol=1e-5, atol=1e-4)
    finally:
        ops.set_avx512(was)
