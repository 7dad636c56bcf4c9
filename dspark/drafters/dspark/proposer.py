"""The DSpark drafter as an engine proposer (`proposer: dspark`).

It observes the target's hidden states of every committed position and keeps, per request, the injected
context keys/values of each draft layer (growing with accepted tokens, never rolled back: the engine only
shows committed rows). A propose call runs the parallel backbone once for all requests, then the Markov
head samples left to right; each token comes with its draft distribution (sampled requests, for lossless
rejection sampling) and its calibrated confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.drafters.dspark.calibration import Calibration
from dspark.drafters.dspark.checkpoint import load_calibration, load_drafter
from dspark.drafters.dspark.model import ContextBuffer, DSparkDrafter, draw_candidates
from dspark.models.llama import Transformer
from dspark.proposers.base import Draft, DraftRequest, Proposer
from dspark.sampling import params_tensors, processed_probs, row_uniforms, sample_rows

# Observed rows kept before their keys/values are computed anyway. It bounds the catch-up a draft call pays
# after steps that did not draft for the request (the hybrid's lookup steps, a gate): the step timings charge
# it to the call, and 256 rows took 7 ms against the call's ~2.4 ms (0.23 ms + 0.027 ms a row; 16: 0.6 ms).
MAX_PENDING_ROWS = 16


@dataclass
class _RequestContext:
    """A request's drafter context: per draft layer, the keys/values of the rows appended so far, and the
    target states of rows observed since (appended at the request's next draft call)."""

    buffers: list[ContextBuffer]
    pending: list[torch.Tensor] = field(default_factory=list)

    @property
    def pending_rows(self) -> int:
        return sum(len(rows) for rows in self.pending)

    @property
    def length(self) -> int:
        return self.buffers[0].length + self.pending_rows


class DSparkProposer(Proposer):
    name = "dspark"

    def __init__(self, drafter: DSparkDrafter, calibration: Calibration | None = None) -> None:
        self.drafter = drafter.eval()
        if next(drafter.parameters()).device.type == "cpu":
            drafter.pack_for_inference()
        self.calibration = calibration
        # Per-position (temperature, offset) tensors of the calibration: greedy (True) and sampled requests.
        self._scalings = (
            {
                greedy: (
                    torch.tensor([x.temperature for x in calibration.scalings(greedy)]),
                    torch.tensor([x.offset for x in calibration.scalings(greedy)]),
                )
                for greedy in (True, False)
            }
            if calibration is not None
            else {}
        )
        self.hidden_layers = tuple(drafter.cfg.target_layer_ids)
        self.draft_to_target = drafter.draft_to_target
        self.draft_length = drafter.draft_length
        self.default_num_speculative_tokens = drafter.draft_length  # the whole block it was trained on
        self.contexts: dict[str, _RequestContext] = {}

    @property
    def cost_signature(self) -> str:
        return f"{self.name}{self.drafter.cfg.model_dump_json()}"

    @classmethod
    def load(cls, directory: str | Path, target: Transformer) -> DSparkProposer:
        return cls(load_drafter(directory, target), load_calibration(directory))

    # ---- observer ---------------------------------------------------------------------------------------

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        """Keep the rows; their keys/values are computed when the request is next drafted for, so steps
        that do not draft for it (gated, or prompt lookup's) cost nothing, and rows batch up."""
        context = self.contexts.get(request.request_id)
        if context is None:
            context = self.contexts[request.request_id] = _RequestContext(self.drafter.new_context())
        context.pending.append(features)
        if context.pending_rows >= MAX_PENDING_ROWS:
            self._flush(context)

    def release(self, request: DraftRequest) -> None:
        self.contexts.pop(request.request_id, None)

    @torch.inference_mode()
    def _flush(self, context: _RequestContext) -> None:
        if context.pending:
            rows = context.pending[0] if len(context.pending) == 1 else torch.cat(context.pending)
            self.drafter.append_context(context.buffers, rows)
            context.pending.clear()

    # ---- proposer ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        """Drafts for requests whose context the target has fed up to the anchor; others get none (the
        step that finishes a prompt produces the first anchor, drafting starts on the next)."""
        ready = [
            i
            for i, r in enumerate(requests)
            if r.request_id in self.contexts and self.contexts[r.request_id].length == len(r.token_ids) - 1
        ]
        drafts = [Draft([]) for _ in requests]
        if ready:
            made = self._propose_ready([requests[i] for i in ready], [max_lens[i] for i in ready])
            for i, draft in zip(ready, made, strict=True):
                drafts[i] = draft
        return drafts

    def _propose_ready(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        for r in requests:
            self._flush(self.contexts[r.request_id])
        contexts = [self.contexts[r.request_id].buffers for r in requests]
        anchors = torch.tensor([r.token_ids[-1] for r in requests])
        positions = torch.tensor([c[0].length for c in contexts])
        hidden = self.drafter.draft_hidden(anchors, positions, contexts)
        base = self.drafter.base_logits(hidden)
        steps = min(self.draft_length, max(max_lens))
        return self._sample_sequentially(requests, anchors, hidden, base, steps, max_lens)

    def _sample_sequentially(
        self, requests, anchors: torch.Tensor, hidden: torch.Tensor, base: torch.Tensor, steps: int, max_lens
    ) -> list[Draft]:
        """The Markov head, left to right: position k's logits get the bias of the token drawn at k-1. Only
        the draw is sequential; the confidences of all positions come in one pass afterwards."""
        d = self.drafter
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        sampling = params_tensors(params, [1] * len(requests))
        uniforms = self._uniforms(requests, greedy, steps)
        if d.fused is not None and d.confidence_head is not None:
            drawn, embeddings, dists = d.fused.markov_draw(base, anchors, steps, sampling, uniforms)
            confidences = self._confidences(hidden[:, :steps], embeddings, greedy)
        else:
            drawn, dists, confidences = self._draw_in_python(anchors, hidden, base, steps, sampling, uniforms)
        token_ids = drawn.tolist()
        return [
            Draft(
                tokens=token_ids[i][: max_lens[i]],
                probs=None if greedy[i] else self._target_space(dists[i, : max_lens[i]]),
                confidences=confidences[i, : max_lens[i]],
            )
            for i in range(len(requests))
        ]

    @staticmethod
    def _uniforms(requests, greedy: list[bool], steps: int) -> torch.Tensor:
        """float64 [requests, steps]: the sampled requests' draws (seeded ones from their generators), 0 for
        greedy requests (they consume no randomness)."""
        u = torch.zeros(len(requests), steps, dtype=torch.float64)
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:
            generators = [requests[i].generator for i in sampled]
            u[sampled] = row_uniforms(len(sampled), generators, columns=steps).double()
        return u

    def _draw_in_python(self, anchors, hidden, base, steps: int, sampling, uniforms: torch.Tensor):
        """`FusedDraft.markov_draw` in PyTorch ops (no native kernels, or no confidence head), plus the
        confidences: (target ids [requests, steps], draft distributions or None, confidences)."""
        d = self.drafter
        greedy = sampling[0] <= 0
        allowed = draw_candidates(base[:, :steps])  # every draw picks among these
        tokens, probs, embeddings, top_probs = [], [], [], []
        prev = anchors
        for k in range(steps):
            prev_embedding = d.markov_embedding(prev)
            logits = base[:, k] + d.transition_bias(prev_embedding)
            if allowed is not None:
                logits = logits.masked_fill(~allowed[:, k], float("-inf"))
            drawn, dist = logits.argmax(-1), None
            if not bool(greedy.all()):
                # Over the draft vocabulary: the target's other tokens have probability 0, so temperature,
                # top-k and top-p give what they give over the whole vocabulary, from 6x fewer logits.
                dist = processed_probs(logits, *sampling)
                drawn = torch.where(greedy, drawn, sample_rows(dist, uniforms[:, k]))
            prev = self.draft_to_target[drawn]
            if d.confidence_head is None:  # no confidence head: the draft's own probability stands in
                top_probs.append(torch.softmax(logits.float(), -1).max(-1).values)
            tokens.append(prev)
            probs.append(dist)
            embeddings.append(prev_embedding)
        if top_probs:
            confidences = torch.stack(top_probs, 1)
        else:
            confidences = self._confidences(hidden[:, :steps], torch.stack(embeddings, 1), greedy.tolist())
        dists = None if bool(greedy.all()) else torch.stack(probs, 1)  # [requests, steps, draft vocab]
        return torch.stack(tokens, 1), dists, confidences

    def _confidences(self, hidden: torch.Tensor, embeddings: torch.Tensor, greedy: list[bool]):
        """[requests, steps] calibrated confidences (each request's greedy or sampled scalings)."""
        logits = self.drafter.confidence_logit(hidden, embeddings)
        if self.calibration is None:
            return torch.sigmoid(logits)
        steps = logits.shape[1]
        temperature = torch.stack([self._scalings[g][0][:steps] for g in greedy])
        offset = torch.stack([self._scalings[g][1][:steps] for g in greedy])
        return torch.sigmoid(logits / temperature + offset)

    def _target_space(self, probs: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary probabilities [n, draft vocab] in the target's vocabulary (0 elsewhere): what the
        rejection sampler compares with the target's distribution."""
        if not self.drafter.cfg.reduced_vocab:
            return probs
        full = probs.new_zeros((len(probs), self.drafter.cfg.vocab_size))
        full[:, self.draft_to_target] = probs
        return full
