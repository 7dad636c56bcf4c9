"""A proposer in another process (a disaggregated draft worker), one round trip per step.

The engine side (`RemoteProposer`) keeps what the remote drafter has not seen yet: each request's newly
committed tokens, the target's hidden states of those positions (for conditioned drafters) and finished
requests. All of it rides with the next propose call, so the drafter's state there (`ProposerHost`)
equals a colocated drafter's when it drafts. The transport is any callable taking a `DraftCall` and
returning the drafts (a Ray actor call in deployments/, a direct call in tests): no Ray in here.

A remote drafter samples with its own per-request generator (seeded from the request's seed): draft
randomness never needs to be shared with verification for rejection sampling to stay lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dspark.proposers.base import Draft, DraftRequest, Proposer
from dspark.sampling import SamplingParams, make_generator


@dataclass
class RequestUpdate:
    request_id: str
    new_tokens: list[int]  # committed since the last call (the whole prompt the first time)
    params: SamplingParams | None = None  # sent once, with the first update
    features: torch.Tensor | None = None  # target hidden states of newly committed positions


@dataclass
class DraftCall:
    updates: list[RequestUpdate]
    released: list[str]
    propose: list[str]  # request ids to draft for, in order
    max_lens: list[int]


@dataclass
class _MirroredRequest:
    """The remote side's copy of a running request (satisfies DraftRequest)."""

    request_id: str
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class ProposerHost:
    """Runs next to the drafter: applies a call's updates, then drafts."""

    def __init__(self, proposer: Proposer) -> None:
        self.proposer = proposer
        self.requests: dict[str, _MirroredRequest] = {}

    def describe(self) -> ProposerInfo:
        return ProposerInfo(
            self.proposer.name, self.proposer.default_num_speculative_tokens, self.proposer.hidden_layers
        )

    def handle(self, call: DraftCall) -> list[Draft]:
        for request_id in call.released:
            mirrored = self.requests.pop(request_id, None)
            if mirrored is not None:
                self.proposer.release(mirrored)
        for update in call.updates:
            mirrored = self.requests.get(update.request_id)
            if mirrored is None:
                params = update.params or SamplingParams()
                mirrored = _MirroredRequest(update.request_id, params, generator=make_generator(params.seed))
                self.requests[update.request_id] = mirrored
            mirrored.token_ids.extend(update.new_tokens)
            if update.features is not None:
                self.proposer.observe(mirrored, update.features)
        if not call.propose:
            return []
        return self.proposer.propose([self.requests[i] for i in call.propose], call.max_lens)


@dataclass(frozen=True)
class ProposerInfo:
    """What the engine side needs to know of a remote proposer."""

    name: str
    default_num_speculative_tokens: int
    hidden_layers: tuple[int, ...]


class RemoteProposer(Proposer):
    """The engine's proxy for a drafter behind `transport` (one call per propose)."""

    def __init__(self, transport: Callable[[DraftCall], list[Draft]], info: ProposerInfo) -> None:
        self.transport = transport
        self.name = f"{info.name}@remote"
        self.default_num_speculative_tokens = info.default_num_speculative_tokens
        self.hidden_layers = tuple(info.hidden_layers)
        self._synced: dict[str, int] = {}  # request id -> tokens the remote side holds
        self._features: dict[str, list[torch.Tensor]] = {}
        self._released: list[str] = []

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        self._features.setdefault(request.request_id, []).append(features)

    def release(self, request: DraftRequest) -> None:
        self._features.pop(request.request_id, None)
        if self._synced.pop(request.request_id, None) is not None:
            self._released.append(request.request_id)

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        call = DraftCall(
            updates=[self._update(r) for r in requests],
            released=self._released,
            propose=[r.request_id for r in requests],
            max_lens=list(max_lens),
        )
        self._released = []
        return self.transport(call)

    def _update(self, request: DraftRequest) -> RequestUpdate:
        sent = self._synced.get(request.request_id)
        tokens = list(request.token_ids)
        self._synced[request.request_id] = len(tokens)
        pending = self._features.pop(request.request_id, None)
        return RequestUpdate(
            request_id=request.request_id,
            new_tokens=tokens[sent or 0 :],
            params=request.params if sent is None else None,
            features=None if not pending else torch.cat(pending),
        )
