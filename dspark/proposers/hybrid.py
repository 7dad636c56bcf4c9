"""Prompt lookup and a draft model behind one proposer (`proposer: hybrid`).

Prompt lookup is free and strong where the answer copies the prompt (code edits, math restating the
question); a draft model covers the rest but costs a call per step. Each step, every request first gets its
n-gram draft; a request whose suffix matched at least `min_match` tokens keeps it (the long match already
predicts well, so the draft model is not called for it), and the others are drafted by the model in one
batched call. Model drafts carry the drafter's calibrated confidences, n-gram drafts their match length
(the engine's online estimator turns it into confidences), so the prefix scheduler weighs both on one
scale: expected accepted tokens per second.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dspark.proposers.base import Draft, DraftRequest, Proposer
from dspark.proposers.ngram import NgramProposer


def merge_drafts(drafts: list[Draft], indices: Sequence[int], made: Sequence[Draft]) -> list[int]:
    """Put the draft model's drafts for requests `indices` into `drafts`, except an empty one over a lookup
    draft (a model with no context yet keeps the lookup's); returns the requests that took the model's."""
    replaced = []
    for i, draft in zip(indices, made, strict=True):
        if draft.tokens or not drafts[i].tokens:
            drafts[i] = draft
            replaced.append(i)
    return replaced


class HybridProposer(Proposer):
    name = "hybrid"

    def __init__(self, lookup: NgramProposer, model: Proposer, min_match: int = 2) -> None:
        if min_match < 1:
            raise ValueError(f"min_match must be >= 1, got {min_match}")
        self.lookup = lookup
        self.model = model
        self.min_match = min_match
        self.default_num_speculative_tokens = model.default_num_speculative_tokens
        self.hidden_layers = model.hidden_layers
        self.model_calls = 0  # requests the draft model was asked to draft for
        self.lookup_drafts = 0  # requests served by prompt lookup alone

    @property
    def cost_signature(self) -> str:
        return f"{self.name}[{self.lookup.cost_signature},{self.model.cost_signature},{self.min_match}]"

    @property
    def fallbacks(self) -> int:  # type: ignore[override]  # the draft model's, read through
        return self.model.fallbacks

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        drafts, need = self.lookup_stage(requests, max_lens)
        if need:
            merge_drafts(
                drafts, need, self.model_stage([requests[i] for i in need], [max_lens[i] for i in need])
            )
        return drafts

    def lookup_stage(
        self, requests: Sequence[DraftRequest], max_lens: Sequence[int]
    ) -> tuple[list[Draft], list[int]]:
        """Every request's n-gram draft, and the requests whose match is too short to keep it alone (the
        draft model's candidates). The engine calls the two stages itself, to gate each by its own drafts."""
        drafts = self.lookup.propose(requests, max_lens)
        need = [i for i, d in enumerate(drafts) if not d.tokens or (d.scores or [0.0])[0] < self.min_match]
        self.lookup_drafts += len(requests) - len(need)
        return drafts, need

    def model_stage(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        """The draft model's drafts for requests the lookup left to it."""
        self.model_calls += len(requests)
        return self.model.propose(requests, max_lens)

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        self.model.observe(request, features)

    def release(self, request: DraftRequest) -> None:
        self.model.release(request)
