"""The proposer interface: anything that drafts tokens for the target to verify."""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    `scores` are draft-side features for proposers without confidences (an n-gram's match length), from
    which the engine's online estimator predicts them; neither may depend on the token it describes.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None
    scores: list[float] | None = None


class DraftRequest(Protocol):
    """What a proposer may read of a running request."""

    @property
    def request_id(self) -> str: ...

    @property
    def token_ids(self) -> Sequence[int]: ...  # prompt followed by every generated token

    @property
    def params(self) -> SamplingParams: ...

    generator: torch.Generator | None  # the request's own RNG (seeded requests), shared with verification


class Proposer(ABC):
    """Anything that drafts tokens for the target to verify.

    `default_num_speculative_tokens` is the draft length used when the engine configuration sets none
    (a drafter's block size, prompt lookup's own default). A proposer conditioned on the target lists the
    target layers it needs in `hidden_layers`; the engine then shows it those layers' hidden states of
    every committed position (`observe`, see `TargetObserver`). `release` drops a finished request's state.
    `fallbacks` counts drafts a proposer answered empty because its drafter failed (a remote worker that
    died, raised or missed its deadline): one per request and step decoded plainly instead.
    """

    name: str
    default_num_speculative_tokens: int
    hidden_layers: tuple[int, ...] = ()
    fallbacks: int = 0

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        """Draft at most max_lens[i] tokens for request i (fewer, or none, is allowed)."""

    @property
    def cost_signature(self) -> str:
        """What determines a propose call's cost (the cost profile is cached per signature): the name,
        and for a draft model its architecture."""
        return self.name

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """Target hidden states of newly committed positions (only called when `hidden_layers` is set)."""

    def release(self, request: DraftRequest) -> None:  # noqa: B027 (optional hook)
        """The request finished or was aborted: drop any state kept for it."""


class TargetObserver(Protocol):
    """Receives the target's hidden states of every position the engine commits to a request's cache.

    Rows arrive in position order and only once: prompt chunks whole, verification blocks up to the last
    accepted draft token (rejected rows are never shown). `features` concatenates the outputs of
    `hidden_layers` in the order given. Draft models conditioned on the target (DSpark) are observers.
    """

    hidden_layers: tuple[int, ...]

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None: ...

    def release(self, request: DraftRequest) -> None:
        """The request finished or was aborted: drop its state."""
        ...
