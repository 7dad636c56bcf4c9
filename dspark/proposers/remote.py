"""A proposer in another process (a disaggregated draft worker), one round trip per step.

The engine side (`RemoteProposer`) keeps what the remote drafter has not seen yet: each request's newly
committed tokens, the target's hidden states of those positions (for conditioned drafters) and finished
requests. All of it rides with the next propose call, so the drafter's state there (`ProposerHost`)
equals a colocated drafter's when it drafts. The transport is any callable taking a `DraftCall` and a
deadline in seconds and returning the drafts (a Ray actor call in deployments/, a direct call in tests):
no Ray in here.

A remote drafter samples with its own per-request generator (seeded from the request's seed): draft
randomness never needs to be shared with verification for rejection sampling to stay lossless.

**Faults degrade, never fail.** A call that raises or misses its deadline (the worker died, is
restarting, hangs, or its drafter raised) is answered with empty drafts: those requests decode plainly
through the target this step (draft length 0), which verification makes token-identical for greedy
requests and distribution-identical for sampled ones. After a fault the remote side's copy of every
request is in doubt (a restarted worker has none; a timed-out call may still be applied later), so:

- requests whose state is only tokens (n-gram) are resynchronised: the next call releases the remote copy
  and resends the whole history, and they draft again as soon as the worker answers;
- requests of a drafter conditioned on target hidden states (DSpark) cannot be rebuilt, since the hidden
  states of committed positions are forwarded once and not kept here (keeping them all would cost
  positions x layers x width per request on the engine, 9 KB per token for SmolLM2, GBs for larger targets).
  Those requests finish without drafts; requests that arrive after the fault, and those whose whole history
  was still waiting here or rode in the failed call, draft normally.

Every update carries the number of tokens the remote copy must already hold; a host that holds another
number (it restarted between two calls) refuses the call (`RemoteStateLost`), which takes the same path.
After a fault the engine skips the worker for `retry_after_s`, doubling up to `max_retry_after_s` while
faults continue, so that a restarting worker does not cost every step a deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dspark.proposers.base import Draft, DraftRequest, Proposer
from dspark.sampling import SamplingParams, make_generator

log = logging.getLogger(__name__)

DRAFT_DEADLINE_S = 1.0  # a draft call that takes longer is treated as failed (a step is tens of ms)
RETRY_AFTER_S = 0.5  # first pause after a fault before the worker is called again
MAX_RETRY_AFTER_S = 10.0


@dataclass
class RequestUpdate:
    request_id: str
    new_tokens: list[int]  # committed since the last call (the whole history the first time)
    start: int = 0  # tokens the remote copy holds before this update (0: a new copy, `params` set)
    params: SamplingParams | None = None  # sent once, with the first update
    features: torch.Tensor | None = None  # target hidden states of newly committed positions


@dataclass
class DraftCall:
    updates: list[RequestUpdate]
    released: list[str]
    propose: list[str]  # request ids to draft for, in order
    max_lens: list[int]


Transport = Callable[[DraftCall, float | None], list[Draft]]  # (call, deadline in seconds) -> drafts


class RemoteStateLost(RuntimeError):
    """The host does not hold the request state an update builds on (it restarted, or a call was lost)."""


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
            self._drop(request_id)
        stale = [u.request_id for u in call.updates if not self._continues(u)]
        if stale:  # checked before anything is applied
            raise RemoteStateLost(f"no matching remote state for requests {stale}")
        for update in call.updates:
            if update.start == 0:
                self._drop(update.request_id)
                params = update.params or SamplingParams()
                mirrored = _MirroredRequest(update.request_id, params, generator=make_generator(params.seed))
                self.requests[update.request_id] = mirrored
            mirrored = self.requests[update.request_id]
            mirrored.token_ids.extend(update.new_tokens)
            if update.features is not None:
                self.proposer.observe(mirrored, update.features)
        if not call.propose:
            return []
        return self.proposer.propose([self.requests[i] for i in call.propose], call.max_lens)

    def _continues(self, update: RequestUpdate) -> bool:
        if update.start == 0:
            return update.params is not None
        mirrored = self.requests.get(update.request_id)
        return mirrored is not None and len(mirrored.token_ids) == update.start

    def _drop(self, request_id: str) -> None:
        mirrored = self.requests.pop(request_id, None)
        if mirrored is not None:
            self.proposer.release(mirrored)


@dataclass(frozen=True)
class ProposerInfo:
    """What the engine side needs to know of a remote proposer."""

    name: str
    default_num_speculative_tokens: int
    hidden_layers: tuple[int, ...]


class RemoteProposer(Proposer):
    """The engine's proxy for a drafter behind `transport` (one call per propose).

    `failures` counts failed calls (raised or past `deadline_s`); `fallbacks` counts drafts answered empty
    because of a fault (one per request and step decoded plainly instead), which the engine reports per step.
    """

    def __init__(
        self,
        transport: Transport,
        info: ProposerInfo,
        deadline_s: float | None = DRAFT_DEADLINE_S,
        retry_after_s: float = RETRY_AFTER_S,
        max_retry_after_s: float = MAX_RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.name = f"{info.name}@remote"
        self.default_num_speculative_tokens = info.default_num_speculative_tokens
        self.hidden_layers = tuple(info.hidden_layers)
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self.clock = clock
        self.failures = 0
        self.fallbacks = 0
        self._synced: dict[str, int] = {}  # request id -> tokens the remote side holds
        self._features: dict[str, list[torch.Tensor]] = {}  # not yet sent, in position order
        self._released: list[str] = []
        self._abandoned: set[str] = set()  # remote state lost and not rebuildable: no more drafts
        self._pause = 0.0
        self._retry_at = float("-inf")

    @property
    def healthy(self) -> bool:
        """False from a fault until the worker answers again."""
        return self._pause == 0.0

    @property
    def retry_at(self) -> float:
        """When (on `clock`) the worker is called again after a fault; -inf while healthy."""
        return self._retry_at

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        if request.request_id not in self._abandoned:
            self._features.setdefault(request.request_id, []).append(features)

    def release(self, request: DraftRequest) -> None:
        self._features.pop(request.request_id, None)
        self._abandoned.discard(request.request_id)
        if self._synced.pop(request.request_id, None) is not None:
            self._released.append(request.request_id)

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        wanted = [i for i, r in enumerate(requests) if r.request_id not in self._abandoned]
        self.fallbacks += len(requests) - len(wanted)
        if not wanted and not self._released:
            return drafts
        if self.clock() < self._retry_at:
            self.fallbacks += len(wanted)
            return drafts
        call = DraftCall(
            updates=[self._update(requests[i]) for i in wanted],
            released=self._released,
            propose=[requests[i].request_id for i in wanted],
            max_lens=[max_lens[i] for i in wanted],
        )
        self._released = []
        try:
            got = self.transport(call, self.deadline_s)
            if len(got) != len(wanted):
                raise RuntimeError(f"the drafter answered {len(got)} drafts for {len(wanted)} requests")
        except Exception as err:
            self._fault(call, err)
            self.fallbacks += len(wanted)
            return drafts
        if self._pause:
            log.info("draft worker answers again: speculation resumes")
        self._pause, self._retry_at = 0.0, float("-inf")
        for i, draft in zip(wanted, got, strict=True):
            drafts[i] = draft
        return drafts

    def _update(self, request: DraftRequest) -> RequestUpdate:
        sent = self._synced.get(request.request_id)
        tokens = list(request.token_ids)
        self._synced[request.request_id] = len(tokens)
        pending = self._features.pop(request.request_id, None)
        return RequestUpdate(
            request_id=request.request_id,
            new_tokens=tokens[sent or 0 :],
            start=sent or 0,
            params=request.params if sent is None else None,
            features=None if not pending else torch.cat(pending),
        )

    def _fault(self, call: DraftCall, err: Exception) -> None:
        """Forget what the remote side holds: resend token-only state, abandon lost conditioned state."""
        self.failures += 1
        self._pause = min(max(self._pause * 2, self.retry_after_s), self.max_retry_after_s)
        self._retry_at = self.clock() + self._pause
        log.warning("draft worker failed (%s: %s): plain decoding, next try in %.1fs",
                    type(err).__name__, err, self._pause)  # fmt: skip
        whole = {u.request_id: u for u in call.updates if u.start == 0}
        released = dict.fromkeys([*call.released, *self._released])  # the remote may not have seen them
        for request_id in list(self._synced):
            del self._synced[request_id]
            released[request_id] = None
            first = whole.get(request_id)
            if not self.hidden_layers:
                continue  # tokens only: the next call resends the whole history
            if first is not None:  # its whole history rode in the failed call: put its features back
                if first.features is not None:
                    self._features.setdefault(request_id, []).insert(0, first.features)
                continue
            self._abandoned.add(request_id)
            self._features.pop(request_id, None)
        self._released = list(released)
