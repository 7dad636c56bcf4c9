"""Per-request sampling parameters and the logits -> probabilities transform shared by target and draft."""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

MAX_STOP_STRINGS = 16  # per request; each is matched against the output at every step
MAX_STOP_LENGTH = 256  # characters per stop string
# Top-k and top-p decide among each row's 256 largest logits when the kept tokens lie among them: sorting the
# target's 49,152 logits took 3.5 ms a row (20 ms for an 8-row verification), the 256 largest 0.07 ms.
FILTER_CANDIDATES = 256


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="sampling temperature; 0 is greedy"
    )
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens; 0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**64, description="the request's own RNG seed (reproducible sampling)"
    )
    max_tokens: int = Field(128, ge=1, description="most tokens to generate")
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] = Field(
        [], max_length=MAX_STOP_STRINGS, description="stop strings (not in the output)"
    )
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def params_tensors(
    params: Sequence[SamplingParams], repeats: Sequence[int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (temperature, top_k, top_p); request i fills `repeats[i]` consecutive rows."""
    reps = torch.tensor(list(repeats), dtype=torch.long)
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    return tuple(t.repeat_interleave(reps).to(device) for t in (temperature, top_k, top_p))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG for a seeded request; None (global RNG) otherwise."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _filter_sorted(sorted_logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Top-k then top-p on logits sorted descending, with HF TopK/TopP warper semantics."""
    vocab = sorted_logits.size(-1)
    # top-k: drop values strictly below the k-th largest, so ties with the k-th value survive (as HF)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -float("inf"))
    # top-p: HF drops a token when the mass at or below it (ascending cumsum) is <= 1 - top_p;
    # the top token always has mass 1 there, so it is always kept
    probs = sorted_logits.softmax(-1)
    mass_below = probs.flip(-1).cumsum(-1).flip(-1)
    return sorted_logits.masked_fill(mass_below <= (1 - top_p)[:, None], -float("inf"))


def _kept_among_largest(
    scaled: Tensor, top_k: Tensor, top_p: Tensor, needs_filter: Tensor, size: int = FILTER_CANDIDATES
) -> tuple[Tensor, Tensor]:
    """Which tokens top-k then top-p keep ([N, V] bool, `_filter_sorted`'s rule), decided from each row's
    `size` largest logits, and which rows that decides ([N] bool): a filtered row that may keep a token past
    them is left to a full sort (its kept row here means nothing)."""
    vocab = scaled.shape[-1]
    if size >= vocab:
        return torch.ones_like(scaled, dtype=torch.bool), ~needs_filter
    values, order = scaled.topk(size + 1, dim=-1)  # descending
    head, beyond = values[:, :size], values[:, size]
    by_k = top_k > 0
    kth = head.gather(-1, (top_k.clamp(1, size) - 1)[:, None]).squeeze(-1)
    # top-k keeps ties with the k-th value: decided here when the k-th is in the head and no tie runs past it
    k_inside = ~by_k | ((top_k <= size) & (beyond < kth))
    head = head.masked_fill(by_k[:, None] & (head < kth[:, None]), float("-inf"))
    # top-p over what top-k kept: a top-k row's survivors are all in the head; any other row's tail (the
    # tokens past the head) holds mass below every head token, and is dropped whole when that mass is small.
    log_total = torch.where(by_k, torch.logsumexp(head, -1), torch.logsumexp(scaled, -1))
    probs = (head - log_total[:, None]).exp()
    tail = torch.where(by_k, 0.0, (1 - probs.sum(-1)).clamp(min=0))
    mass_below = probs.flip(-1).cumsum(-1).flip(-1) + tail[:, None]
    keep_head = (mass_below > (1 - top_p)[:, None]) & (head > float("-inf"))
    p_inside = tail <= 1 - top_p
    kept = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, order[:, :size], keep_head)
    return kept | ~needs_filter[:, None], k_inside & p_inside | ~needs_filter


def _filtered(scaled: Tensor, top_k: Tensor, top_p: Tensor, needs_filter: Tensor) -> Tensor:
    """Scaled logits with what top-k then top-p drop set to -inf: each row decided among its few hundred
    largest logits where that suffices, the others (rows that keep tokens past them) by a sort of their
    own."""
    kept, decided = _kept_among_largest(scaled, top_k, top_p, needs_filter)
    out = scaled.masked_fill(~kept, -float("inf"))
    rest = (~decided).nonzero().squeeze(-1)
    if len(rest):  # one flat row must not cost every row of the batch a vocabulary sort
        sorted_logits, order = scaled[rest].sort(dim=-1, descending=True, stable=True)
        filtered = _filter_sorted(sorted_logits, top_k[rest], top_p[rest])
        out[rest] = torch.empty_like(sorted_logits).scatter_(-1, order, filtered)
    return out


def processed_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """[N, V] logits -> [N, V] float32 probs after temperature, top-k, top-p; greedy rows are one-hot."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    needs_filter = ((top_k > 0) | (top_p < 1)) & ~greedy
    if bool(needs_filter.any()):  # skip the filters in the common plain-temperature case
        scaled = _filtered(scaled, top_k, top_p.float(), needs_filter)
    probs = scaled.softmax(-1)
    if not bool(greedy.any()):
        return probs
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def sample_rows(weights: Tensor, uniforms: Tensor) -> Tensor:
    """One index per row of non-negative weights [N, V] (unnormalised), by inverse CDF at uniforms [N] in
    [0, 1): index i with probability weights[i] / the row's sum, never a zero-weight index. torch.multinomial
    spent 0.8 ms per 49,152-token row (an exponential per token); a float64 cumulative sum and a binary
    search take ~0.05 ms."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    if bool((total <= 0).any()):
        raise ValueError("a row to sample from has no positive weight")
    point = (uniforms.double()[:, None] * total).clamp(max=torch.nextafter(total, torch.zeros_like(total)))
    # the first index whose cumulative weight exceeds the point: its own weight is positive
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def row_uniforms(
    n: int,
    generators: Sequence[torch.Generator | None],
    device: torch.device | str = "cpu",
    columns: int | None = None,
) -> Tensor:
    """One U(0, 1) per row ([n]), or `columns` per row ([n, columns]): seeded rows from their request's
    generator (a row's columns in order, as that many single draws would give), the rest from the global
    RNG."""
    shape = (n,) if columns is None else (n, columns)
    u = torch.rand(shape, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(shape[1:] or (1,), generator=g, device=device).reshape(shape[1:])
    return u
