"""The native small-M linear kernel against `F.linear` (the reference), and the Linear layer's dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels import native_ops, small_m_linear
from dspark.models.linear import SMALL_M_ROWS, Linear
from dspark.sampling import SamplingParams, params_tensors, processed_probs, sample_rows

op = small_m_linear()
needs_kernel = pytest.mark.skipif(op is None, reason="native kernel unavailable on this machine")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(4, 16), (960, 576), (576, 1536), (12, 48)])
def test_small_m_linear_matches_f_linear(rows: int, out_features: int, in_features: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_small_m_linear_rejects_bad_shapes() -> None:
    with pytest.raises(RuntimeError, match="multiple"):
        op(torch.randn(1, 24), torch.randn(8, 24))  # K not a multiple of 16 (the kernels' 16-lane chains)
    with pytest.raises(RuntimeError, match="fp32"):
        op(torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))


@pytest.mark.parametrize("rows", [1, SMALL_M_ROWS, SMALL_M_ROWS + 1, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_layer_every_path_matches(rows: int, bias: bool) -> None:
    """Whatever kernel the row count selects (native, oneDNN, F.linear), the result is the same."""
    layer = Linear(64, 48, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 64)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    layer.unpack()
    torch.testing.assert_close(layer(x), expected)


ops = native_ops()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm_rows_matches_f_rms_norm(rows: int) -> None:
    x = torch.randn(rows, 576) * torch.logspace(-2, 3, rows)[:, None]  # sink-token magnitudes included
    w = torch.randn(576)
    torch.testing.assert_close(ops.rms_norm_rows(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5))


@needs_kernel
@pytest.mark.parametrize(("start", "n"), [(0, 1), (6, 1), (199, 1), (1023, 1), (0, 5), (40, 8), (100, 3)])
def test_block_attention_matches_masked_softmax_attention(start: int, n: int) -> None:
    """Rows stack 3 query heads x n tokens per KV head; token j sees keys [0, start + j], no later ones."""
    group = 3
    q, k, v = torch.randn(3, group * n, 64), torch.randn(3, 1024, 64), torch.randn(3, 1024, 64)
    end = start + n
    scores = q @ k[:, :end].transpose(1, 2) / 8.0
    token = torch.arange(group * n) % n
    scores = scores.masked_fill(torch.arange(end)[None, :] > (start + token)[:, None], float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v[:, :end]
    torch.testing.assert_close(ops.block_attention(q, k, v, start, n), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_ragged_attention_appends_and_attends_every_request() -> None:
    """Requests of 1..5 new tokens in one call: their keys/values land in their own slots, and every query
    sees its slot's cache plus its block's tokens up to itself (GQA: query head h reads KV head h // 3)."""
    gen = torch.Generator().manual_seed(0)
    slots, hkv, max_len, d, group = 6, 3, 64, 64, 3
    k_cache, v_cache = (
        torch.randn(slots, hkv, max_len, d, generator=gen),
        torch.randn(slots, hkv, max_len, d, generator=gen),
    )
    layout = [(4, 10, 1), (0, 0, 3), (5, 33, 5), (2, 7, 2)]  # (slot, start, n)
    total = sum(n for *_, n in layout)
    q = torch.randn(total, hkv * group, d, generator=gen)
    k_new, v_new = torch.randn(total, hkv, d, generator=gen), torch.randn(total, hkv, d, generator=gen)
    expected_k, expected_v, expected = k_cache.clone(), v_cache.clone(), []
    offset = 0
    for slot, start, n in layout:
        rows = slice(offset, offset + n)
        expected_k[slot, :, start : start + n] = k_new[rows].transpose(0, 1)
        expected_v[slot, :, start : start + n] = v_new[rows].transpose(0, 1)
        keys = expected_k[slot, :, : start + n].repeat_interleave(group, 0)  # [H, keys, d]
        values = expected_v[slot, :, : start + n].repeat_interleave(group, 0)
        scores = q[rows].transpose(0, 1) @ keys.transpose(1, 2) / d**0.5  # [H, n, keys]
        future = torch.arange(start + n)[None, :] > (start + torch.arange(n))[:, None]
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ values
        expected.append(attn.transpose(0, 1))
        offset += n
    out = ops.ragged_attention(q, k_new, v_new, k_cache, v_cache, torch.tensor(layout))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, expected_k)
    torch.testing.assert_close(v_cache, expected_v)
    with pytest.raises(RuntimeError, match="layout covers"):
        ops.ragged_attention(q[:-1], k_new[:-1], v_new[:-1], k_cache, v_cache, torch.tensor(layout))


@needs_kernel
def test_ragged_attention_rows_do_not_interact() -> None:
    """A verify block's outputs are, bit for bit, what decoding its tokens one at a time gives (the property
    that keeps speculative output equal to plain decoding's), with contexts spanning several key chunks and
    query rows split into work items differently in the two runs."""
    gen = torch.Generator().manual_seed(1)
    slots, hkv, max_len, d, group = 3, 3, 320, 64, 3
    caches = torch.randn(2, slots, hkv, max_len, d, generator=gen)
    layout = [(0, 150, 8), (1, 77, 1), (2, 230, 5)]  # (slot, start, n)
    total = sum(n for *_, n in layout)
    q = torch.randn(total, hkv * group, d, generator=gen)
    k_new, v_new = torch.randn(total, hkv, d, generator=gen), torch.randn(total, hkv, d, generator=gen)
    k_block, v_block = caches[0].clone(), caches[1].clone()
    block = ops.ragged_attention(q, k_new, v_new, k_block, v_block, torch.tensor(layout))
    k_one, v_one = caches[0].clone(), caches[1].clone()
    offset = 0
    for slot, start, n in layout:
        for i in range(n):
            row = slice(offset + i, offset + i + 1)
            one_row = torch.tensor([[slot, start + i, 1]])
            alone = ops.ragged_attention(q[row], k_new[row], v_new[row], k_one, v_one, one_row)
            assert torch.equal(alone, block[row]), (slot, i)
        offset += n
    assert torch.equal(k_one, k_block) and torch.equal(v_one, v_block)


def _markov_inputs(vocab: int, requests: int, steps: int, rank: int = 20, target_vocab: int = 5000):
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-40, 41, (requests, steps + 1, vocab), generator=gen).float() / 8
    base[0, 0, :5] = -0.0
    w1 = torch.randn(target_vocab, rank, generator=gen)
    w2 = torch.randn(vocab, rank, generator=gen)
    d2t = torch.randperm(target_vocab, generator=gen)[:vocab]
    anchors = torch.randint(0, target_vocab, (requests,), generator=gen)
    return base, anchors, w1, w2, d2t


def _draw(inputs, steps: int, candidates: int, temperature, top_k, top_p, uniforms):
    rows = len(inputs[1])
    sampling = (
        torch.tensor(temperature, dtype=torch.float32).expand(rows).contiguous(),
        torch.tensor(top_k).expand(rows).contiguous(),
        torch.tensor(top_p, dtype=torch.float32).expand(rows).contiguous(),
    )
    return ops.markov_draw(*inputs, steps, candidates, *sampling, uniforms)


@needs_kernel
@pytest.mark.parametrize("vocab", [300, 1000])
def test_markov_greedy_draw_chooses_among_the_top_candidates_as_the_reference(vocab: int) -> None:
    """The native greedy Markov draw against a plain loop over the rule's own words: each position's token is
    the first argmax of base + W2 W1[previous] over the tokens whose base logit is among the `candidates`
    largest, ties at the last one kept. Base logits on a coarse grid make ties at that boundary common (and
    hold both zeros); rank 20 is not a multiple of the kernel's 8 lanes."""
    requests, steps, candidates = 3, 7, 64
    inputs = base, anchors, w1, w2, d2t = _markov_inputs(vocab, requests, steps)
    uniforms = torch.zeros(requests, steps, dtype=torch.float64)
    tokens, embeddings, probs = _draw(inputs, steps, candidates, 0.0, 0, 1.0, uniforms)
    assert probs.numel() == 0  # no row samples
    for r in range(requests):
        prev = int(anchors[r])
        for k in range(steps):
            floor = base[r, k].sort(descending=True).values[candidates - 1]
            logits = base[r, k] + w2 @ w1[prev]
            torch.testing.assert_close(embeddings[r, k], w1[prev])
            prev = int(d2t[logits.masked_fill(base[r, k] < floor, float("-inf")).argmax()])
            assert int(tokens[r, k]) == prev, (r, k)
    unrestricted = _draw(inputs, steps, vocab, 0.0, 0, 1.0, uniforms)[0]
    assert not torch.equal(unrestricted, tokens)  # the restriction bites on these logits


@needs_kernel
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 0, 1.0), (1.3, 0, 0.8), (0.7, 20, 1.0), (0.9, 5, 0.5), (0.5, 700, 0.95), (2.0, 0, 0.999)],
)
def test_markov_sampled_draw_is_processed_probs_and_an_inverse_cdf_draw(temperature, top_k, top_p) -> None:
    """A sampled row's distribution at each position is `processed_probs` (the sampling module's own rule:
    top-k ties with the k-th value kept, top-p over the descending order) of base + W2 W1[previous] on the
    tokens whose base logit is among the `candidates` largest, -inf elsewhere; its token is `sample_rows` of
    that distribution at the row's uniform. The coarse logit grid puts ties at the candidate, top-k and top-p
    boundaries; top-k 700 keeps every candidate, and leaves top-p to decide."""
    vocab, requests, steps, candidates = 1000, 3, 7, 300
    inputs = base, anchors, w1, w2, d2t = _markov_inputs(vocab, requests, steps)
    uniforms = torch.rand(requests, steps, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tokens, embeddings, probs = _draw(inputs, steps, candidates, temperature, top_k, top_p, uniforms)
    sampling = params_tensors([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)], [1])
    for r in range(requests):
        prev = int(anchors[r])
        for k in range(steps):
            floor = base[r, k].sort(descending=True).values[candidates - 1]
            logits = (base[r, k] + w2 @ w1[prev]).masked_fill(base[r, k] < floor, float("-inf"))
            expected = processed_probs(logits[None], *sampling)[0]
            torch.testing.assert_close(probs[r, k], expected, rtol=1e-4, atol=1e-6)
            assert torch.equal(probs[r, k] > 0, expected > 0), (r, k)  # the same kept set
            drawn = int(sample_rows(probs[r, k][None], uniforms[r, k : k + 1])[0])
            torch.testing.assert_close(embeddings[r, k], w1[prev])
            prev = int(d2t[drawn])
            assert int(tokens[r, k]) == prev, (r, k)


@needs_kernel
def test_markov_draw_mixes_greedy_and_sampled_rows() -> None:
    """Each row follows its own temperature: the greedy row draws as it would alone, the sampled one as it
    would alone, and only the sampled row carries a distribution."""
    vocab, steps = 300, 5
    inputs = _markov_inputs(vocab, 2, steps)
    uniforms = torch.rand(2, steps, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sampling = (torch.tensor([0.0, 0.8]), torch.tensor([0, 10]), torch.tensor([1.0, 0.9]))
    tokens, _, probs = ops.markov_draw(*inputs, steps, 64, *sampling, uniforms)
    alone = [tuple(x[i : i + 1] for x in inputs[:2]) + inputs[2:] for i in range(2)]
    greedy = ops.markov_draw(*alone[0], steps, 64, *(x[:1] for x in sampling), uniforms[:1])
    sampled = ops.markov_draw(*alone[1], steps, 64, *(x[1:] for x in sampling), uniforms[1:])
    assert torch.equal(tokens[0], greedy[0][0]) and torch.equal(tokens[1], sampled[0][0])
    assert not probs[0].any() and torch.equal(probs[1], sampled[2][0])
