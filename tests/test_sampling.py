import pytest
import torch
from pydantic import ValidationError
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dspark.sampling import (
    FILTER_CANDIDATES,
    SamplingParams,
    _kept_among_largest,
    make_generator,
    params_tensors,
    processed_probs,
    row_uniforms,
    sample_rows,
)


def hf_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row through HF's warpers in generate()'s order, then softmax; greedy is one-hot at argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].float())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)[0]


def random_params(n: int, gen: torch.Generator) -> list[tuple[float, int, float]]:
    temps, ks, ps = [0.0, 0.3, 1.0, 1.7], [0, 1, 5, 20, 100], [1.0, 0.95, 0.5, 0.05]

    def pick(xs: list):
        return xs[int(torch.randint(len(xs), (1,), generator=gen))]

    return [(pick(temps), pick(ks), pick(ps)) for _ in range(n)]


def test_matches_hf_warpers_with_mixed_rows():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 200, 50
    logits = torch.randn(n, vocab, generator=gen) * 3
    rows = random_params(n, gen)
    temperature, top_k, top_p = (torch.tensor(col) for col in zip(*rows, strict=True))
    out = processed_probs(logits, temperature, top_k, top_p)
    ref = torch.stack([hf_reference(logits[i], *rows[i]) for i in range(n)])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # the filters really bite: some rows lose tokens, none loses all
    assert (out == 0).any(dim=-1).sum() > n // 2
    torch.testing.assert_close(out.sum(-1), torch.ones(n))


@pytest.mark.parametrize(("scale", "shortcut"), [(12.0, True), (0.5, False)])
def test_matches_hf_warpers_over_the_targets_vocabulary(scale: float, shortcut: bool):
    """At SmolLM2's 49,152 tokens: peaked rows (scale 12) keep only tokens among their 256 largest logits, so
    the filters are decided there without a vocabulary sort; flat rows (scale 0.5) keep thousands at top-p
    0.95, so the sort decides. Both agree with HF's warpers."""
    gen = torch.Generator().manual_seed(2)
    n, vocab = 48, 49152
    logits = torch.randn(n, vocab, generator=gen) * scale
    rows = random_params(n, gen)
    rows[:3] = [(1.0, 0, 0.95), (0.3, 100, 1.0), (1.7, 5, 0.5)]  # top-p alone, top-k alone, both
    temperature, top_k, top_p = (torch.tensor(col) for col in zip(*rows, strict=True))
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = ((top_k > 0) | (top_p < 1)) & (temperature > 0)
    _, decided = _kept_among_largest(scaled, top_k, top_p, needs_filter)
    assert bool(decided.all()) == shortcut
    out = processed_probs(logits, temperature, top_k, top_p)
    ref = torch.stack([hf_reference(logits[i], *rows[i]) for i in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert ((out > 0).sum(-1)[needs_filter] < vocab).all()  # every filtered row lost tokens


def test_flat_rows_are_sorted_alone_and_every_row_matches_hf():
    """A batch of peaked and flat rows: the peaked ones are decided among their largest logits, the flat ones
    by a sort of their own, and all agree with HF's warpers."""
    gen = torch.Generator().manual_seed(5)
    n, vocab = 8, 49152
    scale = torch.tensor([12.0, 0.5] * (n // 2))[:, None]
    logits = torch.randn(n, vocab, generator=gen) * scale
    rows = [(1.0, 0, 0.95)] * n
    temperature, top_k, top_p = (torch.tensor(col) for col in zip(*rows, strict=True))
    _, decided = _kept_among_largest(logits, top_k, top_p, torch.ones(n, dtype=torch.bool))
    assert decided.tolist() == [True, False] * (n // 2)
    out = processed_probs(logits, temperature, top_k, top_p)
    ref = torch.stack([hf_reference(logits[i], *rows[i]) for i in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_top_k_ties_past_the_candidates_go_to_the_sort():
    """A top-k cut whose value ties with logits past the 256 largest keeps all of them, as HF does."""
    head = torch.linspace(10, 5, FILTER_CANDIDATES - 1)
    logits = torch.cat([head, torch.full((10,), 1.0), torch.zeros(500)])[None]
    out = processed_probs(logits, torch.ones(1), torch.tensor([FILTER_CANDIDATES]), torch.ones(1))
    torch.testing.assert_close(out[0], hf_reference(logits[0], 1.0, FILTER_CANDIDATES, 1.0))
    assert int((out > 0).sum()) == FILTER_CANDIDATES + 9


def test_greedy_rows_are_one_hot_at_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 2.0]])
    zeros = torch.zeros(2)
    out = processed_probs(logits, zeros, torch.tensor([2, 0]), torch.tensor([0.5, 1.0]))
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    out = processed_probs(logits, torch.ones(1), torch.tensor([2]), torch.ones(1))
    ref = hf_reference(logits[0], 1.0, 2, 1.0)
    torch.testing.assert_close(out[0], ref)
    assert (out[0] > 0).tolist() == [True, True, True, False]


def test_top_p_always_keeps_top_token_and_plain_path():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    t = torch.full((8,), 0.8)
    tiny = processed_probs(logits, t, torch.zeros(8, dtype=torch.long), torch.full((8,), 1e-6))
    assert tiny.tolist() == torch.nn.functional.one_hot(logits.argmax(-1), 30).float().tolist()
    plain = processed_probs(logits.half(), t, torch.zeros(8, dtype=torch.long), torch.ones(8))
    torch.testing.assert_close(plain, (logits.half().float() / 0.8).softmax(-1))


def test_params_tensors_repeat_interleave():
    params = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(), SamplingParams(top_p=0.9)]
    temperature, top_k, top_p = params_tensors(params, [2, 0, 3])
    assert temperature.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]
    assert top_k.tolist() == [3, 3, 0, 0, 0]
    torch.testing.assert_close(top_p, torch.tensor([1.0, 1.0, 0.9, 0.9, 0.9]))
    assert top_k.dtype == torch.long and temperature.dtype == torch.float32


def test_sampling_params_defaults_and_generator():
    p = SamplingParams()
    assert p.greedy and p.max_tokens == 128 and p.stop == [] and not p.ignore_eos
    assert not SamplingParams(temperature=0.7).greedy
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**kwargs)


def test_sample_rows_draws_each_index_with_its_weights_share():
    """Chi-square of 40,000 inverse-CDF draws against the exact probabilities, rows of unnormalised weights
    with zeros among them (never drawn); the ends of [0, 1) map to the first and last positive index."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 6.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    gen = torch.Generator().manual_seed(4)
    n = 40_000
    drawn = sample_rows(weights.repeat(n, 1), torch.rand(2 * n, generator=gen)).view(n, 2)
    for row in range(2):
        counts = torch.bincount(drawn[:, row], minlength=6).double()
        expected = weights[row].double() / weights[row].sum() * n
        assert (counts[expected == 0] == 0).all()
        positive = expected > 0
        assert chisquare(counts[positive].numpy(), expected[positive].numpy()).pvalue > 1e-3
    ends = sample_rows(weights[:1].repeat(2, 1), torch.tensor([0.0, 1.0 - 2**-24]))
    assert ends.tolist() == [1, 4]
    with pytest.raises(ValueError, match="no positive weight"):
        sample_rows(torch.zeros(1, 3), torch.zeros(1))


def test_row_uniforms_of_seeded_rows_come_from_their_own_generator():
    a = row_uniforms(3, [None, torch.Generator().manual_seed(7), None])
    b = row_uniforms(2, [torch.Generator().manual_seed(7), None])
    assert a[1] == b[0] == torch.rand(1, generator=torch.Generator().manual_seed(7))[0]
    block = row_uniforms(2, [None, torch.Generator().manual_seed(7)], columns=5)
    g = torch.Generator().manual_seed(7)  # a row's columns are that many single draws of its generator
    assert block.shape == (2, 5)
    assert block[1].tolist() == [torch.rand(1, generator=g).item() for _ in range(5)]
