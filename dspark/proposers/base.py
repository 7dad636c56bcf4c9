"""The proposer interface: anything that drafts tokens for the target to verify."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dspark.sampling import SamplingParams


@dataclass
class Draft:
    """Draft tokens for one request.

    `probs` holds the (processed) distributions the tokens were sampled from, needed for lossless
    rejection sampling; None means the tokens were chosen deterministically (a one-hot draft).
    `confidences` are the proposer's estimates that each position survives given the earlier ones did.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None


class DraftRequest(Protocol):
    """What a proposer may read of a running request."""

    @property
    def token_ids(self) -> Sequence[int]: ...  # prompt followed by every generated token

    @property
    def params(self) -> SamplingParams: ...


class Proposer(Protocol):
    name: str
    deterministic: bool  # True: drafts carry no probs, verification treats them as one-hot

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        """Draft at most max_lens[i] tokens for request i (fewer, or none, is allowed)."""
        ...
