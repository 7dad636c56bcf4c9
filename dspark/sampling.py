"""Per-request sampling parameters and the logits -> probabilities transform shared by target and draft."""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

MAX_STOP_STRINGS = 16  # per request; each is matched against the output at every step
MAX_STOP_LENGTH = 256  # characters per stop string


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


def processed_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """[N, V] logits -> [N, V] float32 probs after temperature, top-k, top-p; greedy rows are one-hot."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    needs_filter = ((top_k > 0) | (top_p < 1)) & ~greedy
    if bool(needs_filter.any()):  # skip the vocab sort in the common plain-temperature case
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        filtered = _filter_sorted(sorted_logits, top_k, top_p.float())
        scaled = torch.empty_like(scaled).scatter_(-1, order, filtered)
    probs = scaled.softmax(-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)
