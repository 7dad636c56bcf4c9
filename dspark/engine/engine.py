"""The engine loop: continuous batching, drafting, one ragged verification forward, lossless acceptance.

Each `step()`:
1. admits waiting requests into free KV-cache slots;
2. schedules every running request: decoding ones feed their last token (plus drafts), prefilling ones a
   chunk of the prompt within the step's token budget;
3. asks the proposer for drafts of the requests whose prompt is complete, and the verification policy
   how much of each draft to verify (fixed gamma, a confidence threshold, or the prefix scheduler on the
   profiled cost curve, fed by the drafter's confidences or the online acceptance estimator);
4. runs the target once over the ragged batch and verifies all drafts (greedy match or rejection
   sampling), rolls the KV cache back past rejected tokens, and emits the accepted tokens.
Draft length 0 is plain decoding through the same path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from dspark.engine.config import EngineConfig
from dspark.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from dspark.engine.request import Request, RequestOutput, ResumeState
from dspark.engine.stats import SpecStats, SpecSummary, StepReport
from dspark.errors import InvalidRequestError
from dspark.models.kv_cache import KVCache
from dspark.models.llama import Transformer
from dspark.proposers import Draft, HybridProposer, Proposer, TargetObserver
from dspark.proposers.hybrid import merge_drafts
from dspark.sampling import SamplingParams, params_tensors, processed_probs
from dspark.scheduling import OnlineAcceptanceEstimator, StepShape, VerificationPolicy
from dspark.scheduling.cost_profile import ProfileMeasurement
from dspark.scheduling.policies import Fallback
from dspark.verify import verify


def _truncated(draft: Draft, k: int) -> Draft:
    """A draft cut to k tokens; probs, confidences and scores stay aligned with the tokens."""
    if len(draft.tokens) <= k:
        return draft
    probs = None if draft.probs is None else draft.probs[:k]
    confidences = None if draft.confidences is None else draft.confidences[:k]
    scores = None if draft.scores is None else draft.scores[:k]
    return Draft(draft.tokens[:k], probs, confidences, scores)


ESTIMATOR_FEATURES = 3


def _estimator_features(request: Request, draft: Draft) -> list[list[float]]:
    """Per draft position: the proposer's score (an n-gram's match length); how far into its output the
    request is (the first drafts of an answer are rarely right: they copy the prompt's template); and the
    request's own acceptance so far, smoothed toward 1/2 (a request that keeps accepting goes on)."""
    progress = min(len(request.output_ids), 32) / 32
    history = (request.stats.accepted + 1) / (request.stats.drafted + 2)
    scores = draft.scores if draft.scores is not None else [0.0] * len(draft.tokens)
    return [[score, progress, history] for score in scores]


def _draft_distribution(draft: Draft, vocab: int) -> torch.Tensor:
    """The distributions a draft was sampled from; one-hot rows for a deterministic draft."""
    if draft.probs is not None:
        return draft.probs
    return torch.zeros(len(draft.tokens), vocab).scatter_(1, torch.tensor(draft.tokens)[:, None], 1.0)


@dataclass
class _Drafted:
    """One step's drafts: per request its draft and source; how many requests the costly draft call served
    (what the step pays in draft time); whether a gate withheld that call from requests that wanted it."""

    drafts: list[Draft]
    sources: list[str]
    served: int
    gated: bool


@dataclass
class _Scheduled:
    request: Request
    chunk: list[int]  # tokens from `pending` fed this step
    final: bool  # the chunk completes the pending tokens: the step samples a token for this request
    draft: Draft | None = None
    first_row: int = 0  # where this request's tokens start in the step's flattened batch


class Engine:
    """The engine loop over parts built elsewhere (`dspark.assembly.build_engine` turns a config into them).

    `config.num_speculative_tokens` must be resolved (the builder takes the proposer's default when unset).
    A proposer with `hidden_layers` observes the target's hidden states; so does every extra observer (a
    training-data recorder).
    """

    def __init__(
        self,
        config: EngineConfig,
        model: Transformer,
        tokenizer: PreTrainedTokenizerBase,
        cache: KVCache,
        proposer: Proposer | None = None,
        policy: VerificationPolicy | None = None,
        observers: Sequence[TargetObserver] = (),
        profile_measurement: ProfileMeasurement | None = None,
    ) -> None:
        if proposer is not None and (policy is None or config.num_speculative_tokens is None):
            raise ValueError("a speculating engine needs a verification policy and a resolved draft length")
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.proposer = proposer
        self.policy = policy
        self.num_speculative_tokens = config.num_speculative_tokens if proposer is not None else 0
        self.observers: list[TargetObserver] = list(observers)
        if proposer is not None and proposer.hidden_layers:
            self.observers.append(proposer)
        self.hidden_layers = sorted({layer for o in self.observers for layer in o.hidden_layers})
        self.estimator = OnlineAcceptanceEstimator(
            max(self.num_speculative_tokens, 1), num_features=ESTIMATOR_FEATURES
        )
        self._features: dict[int, torch.Tensor] = {}
        self.eos_ids = set(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SpecStats()
        self.last_step = StepReport()
        self.profile_measurement = profile_measurement
        self._explore_turn = 0  # which request a gated source drafts for when exploring
        # Observers must see every prompt row, and tensor-parallel ranks hold their own caches: no reuse.
        blocks = config.prefix_cache_mib * 2**20 // (cache.bytes_per_position * BLOCK_TOKENS)
        reuse = blocks and not self.observers and model.tp_leader is None
        self.prefix_cache = PrefixCache(blocks) if reuse else None

    # ---- requests -------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None
    ) -> list[int]:
        """Token ids of a raw prompt (text or ids) or of chat messages through the model's chat template."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt or messages")
        if messages is not None:
            return list(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
        speculate: bool = True,
        resume: ResumeState | None = None,
        strict_max_tokens: bool = False,
    ) -> str:
        """Queue a request; `speculate=False` decodes it without drafts (the output is the same). `resume`
        continues a request another replica started: its streamed tokens are re-prefilled after the prompt.

        Generation stops at max_model_len (finish reason `length`); with `strict_max_tokens` (a client's own
        max_tokens, as vLLM treats it) a max_tokens that cannot fit after the prompt is refused instead."""
        ids = self.encode_prompt(prompt, messages)
        if not ids:
            raise InvalidRequestError("prompt", "must contain at least one token")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens do not fit max_model_len={limit}")
        params = params or SamplingParams()
        if strict_max_tokens and len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens",
                f"{params.max_tokens} does not fit: the prompt has {len(ids)} tokens and max_model_len is "
                f"{limit}, so at most {limit - len(ids)}",
            )
        vocab = self.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise InvalidRequestError("prompt", f"token ids must lie in [0, {vocab})")
        if request_id is not None and any(r.request_id == request_id for r in (*self.waiting, *self.running)):
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if resume is not None and len(ids) + len(resume.output_ids) >= self.config.max_model_len:
            raise InvalidRequestError("resume.output_ids", "prompt and output do not fit max_model_len")
        request = Request(ids, params, self.tokenizer, request_id, speculate, resume)
        self.waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its slot; returns its final output (None if unknown or done)."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    request.finish_reason = "abort"
                    self._release(request)
                    return request.output([], "")
        return None

    @property
    def profile_pending(self) -> bool:
        return self.profile_measurement is not None

    def advance_profile(self) -> None:
        """Time one run of the pending cost-profile measurement (call when idle); once it completes, the
        scheduler decides with it."""
        if self.profile_measurement is None:
            return
        profile = self.profile_measurement.advance()
        if profile is not None:
            self.policy.profile = profile
            self.profile_measurement = None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._admit()
        self.last_step = StepReport(running=len(self.running), waiting=len(self.waiting))
        if not self.running:
            return []
        began = time.perf_counter()
        scheduled = self._schedule()
        for s in scheduled:
            if s.final:
                s.request.reseed()
        shape = self._propose(scheduled)
        logits = self._forward(scheduled)
        if self.prefix_cache is not None:
            self._store_prefixes(scheduled)
        for s in scheduled:
            if not s.final:  # a prompt chunk: everything it fed stays cached
                self._observe(s.request, s.first_row, len(s.chunk))
                s.request.num_cached += len(s.chunk)
                del s.request.pending[: len(s.chunk)]
        finals = [s for s in scheduled if s.final]
        outputs = self._verify_and_commit(finals, logits) if finals else []
        if shape is not None:  # the policy learns what steps really cost against its profile
            self.policy.observe(shape, self.last_step.verified, time.perf_counter() - began)
        self.running = [r for r in self.running if not r.finished]
        return outputs

    def _admit(self) -> None:
        while self.waiting and self.cache.num_free:
            request = self.waiting.popleft()
            request.slot = self.cache.allocate()
            self.running.append(request)

    def _schedule(self) -> list[_Scheduled]:
        """Decoding requests first (they cost one token each), then prompt chunks within the budget."""
        budget = self.config.max_tokens_per_step
        decoding = [r for r in self.running if len(r.pending) == 1]
        prefilling = [r for r in self.running if len(r.pending) > 1]
        scheduled = [_Scheduled(r, r.pending, final=True) for r in decoding]
        budget -= len(decoding)
        for r in prefilling:
            if budget <= 0:
                break
            if r.num_cached == 0 and self.prefix_cache is not None:
                self._reuse_prefix(r)
            chunk = r.pending[:budget]
            scheduled.append(_Scheduled(r, chunk, final=len(chunk) == len(r.pending)))
            budget -= len(chunk)
        return scheduled

    def _reuse_prefix(self, r: Request) -> None:
        """Before a prompt's first chunk: take its longest cached prefix, keeping at least the last token to
        compute (its logits give the first output token)."""
        limit = min(len(r.prompt_ids), len(r.pending) - 1)
        reused = self.prefix_cache.load(self.cache, r.slot, r.prompt_ids, limit)
        self.last_step.prefix_queried += len(r.prompt_ids)
        self.last_step.prefix_hits += reused
        r.num_cached += reused
        del r.pending[:reused]

    def _store_prefixes(self, scheduled: list[_Scheduled]) -> None:
        """Offer the prompt blocks this step's forward completed to the prefix cache."""
        for s in scheduled:
            r = s.request
            if r.num_cached < len(r.prompt_ids):
                self.prefix_cache.store(self.cache, r.slot, r.prompt_ids, r.num_cached + len(s.chunk))

    def _draft_limit(self, s: _Scheduled) -> int:
        r = s.request
        if not r.speculate:
            return 0
        room = self.config.max_model_len - r.num_cached - len(s.chunk)
        return max(0, min(self.num_speculative_tokens, r.remaining_tokens - 1, room))

    def _propose(self, scheduled: list[_Scheduled]) -> StepShape | None:
        """Draft for the requests whose prompt is complete, then let the policy cut each draft. Returns the
        step's shape, `drafted` the requests the draft call served (None without a proposer)."""
        if self.proposer is None:
            return None
        finals = [s for s in scheduled if s.final]
        wanted = [(s, k) for s in finals if (k := self._draft_limit(s)) > 0]
        decoding = sum(len(s.chunk) == 1 for s in scheduled)
        prefill = sum(len(s.chunk) for s in scheduled if len(s.chunk) > 1)
        sampled = any(not s.request.params.greedy for s in finals)  # dearer rows (and draft call)
        cached = sum(s.request.num_cached for s in scheduled if len(s.chunk) == 1)  # what attention reads
        shape = StepShape(decoding, decoding, len(finals), prefill, sampled=sampled, cached=cached)
        report = self.last_step
        report.could_draft = len(wanted)
        if not wanted:
            return replace(shape, drafted=0)
        fallbacks = self.proposer.fallbacks
        drafted = self._draft([s.request for s, _ in wanted], [k for _, k in wanted], shape)
        report.drafter_fallbacks = self.proposer.fallbacks - fallbacks
        report.gated = drafted.gated
        served = replace(shape, drafted=drafted.served)
        if not any(d.tokens for d in drafted.drafts):
            return served
        drafts = [_truncated(d, k) for (_, k), d in zip(wanted, drafted.drafts, strict=True)]
        confidences = self._confidences([s.request for s, _ in wanted], drafts)
        lengths = self.policy.lengths(confidences, served, drafted.sources)
        report.offered = sum(len(d.tokens) for d in drafts)
        report.verified = sum(min(k, len(d.tokens)) for d, k in zip(drafts, lengths, strict=True))
        for (s, _), draft, k in zip(wanted, drafts, lengths, strict=True):
            s.draft = _truncated(draft, k) if k else None
        return served

    def _draft(self, requests: list[Request], limits: list[int], shape: StepShape) -> _Drafted:
        """Each request's draft (empty where a gate withheld it) and its source. Every source is called for
        as many requests as the policy grants (all, one to explore, none), judged by its own recent drafts:
        the hybrid's prompt lookup first (free: the gate weighs only the verification it would add), then
        its draft model for the requests lookup left to it; a single proposer alone."""
        proposer = self.proposer
        drafts = [Draft([]) for _ in requests]
        sources = [proposer.name] * len(requests)
        candidates = list(range(len(requests)))
        if isinstance(proposer, HybridProposer):
            looked = self._granted(replace(shape, drafted=0), candidates, proposer.lookup.name)
            made, weak = (
                ([], [])
                if not looked
                else proposer.lookup_stage([requests[i] for i in looked], [limits[i] for i in looked])
            )
            for i, draft in zip(looked, made, strict=True):
                drafts[i], sources[i] = draft, proposer.lookup.name
            strong = set(looked) - {looked[j] for j in weak}  # long matches keep their lookup drafts
            candidates = [i for i in candidates if i not in strong]
            source, call = proposer.model.name, proposer.model_stage
        else:
            source, call = proposer.name, proposer.propose
        # The model must beat what its candidates hold without it: their weak lookup drafts, if any.
        weak_drafts = [drafts[i] for i in candidates]
        fallback = (
            partial(self._confidences, [requests[i] for i in candidates], weak_drafts)
            if any(d.tokens for d in weak_drafts)
            else None
        )
        granted = self._granted(shape, candidates, source, fallback)
        if granted:
            made = call([requests[i] for i in granted], [limits[i] for i in granted])
            for i in merge_drafts(drafts, granted, made):
                sources[i] = source
        return _Drafted(drafts, sources, len(granted), bool(candidates) and not granted)

    def _granted(
        self, shape: StepShape, candidates: list[int], source: str, fallback: Fallback = None
    ) -> list[int]:
        """The candidates the policy lets `source` draft for: all, or (gated, exploring) one in turn."""
        count = self.policy.drafting(shape, len(candidates), source, fallback) if candidates else 0
        if count >= len(candidates):
            return candidates
        self._explore_turn += 1
        return [candidates[(self._explore_turn + j) % len(candidates)] for j in range(count)]

    def _confidences(self, requests: list[Request], drafts: list[Draft]) -> list[np.ndarray]:
        """The drafter's own confidences, else the online estimator's from the drafts' features."""
        if all(d.confidences is not None for d in drafts):
            return [d.confidences.double().numpy() for d in drafts]
        estimated = self.estimator.confidences_many(
            [_estimator_features(r, d) for r, d in zip(requests, drafts, strict=True)],
            [r.params.greedy for r in requests],
        )
        return [
            d.confidences.double().numpy() if d.confidences is not None else e
            for d, e in zip(drafts, estimated, strict=True)
        ]

    def _forward(self, scheduled: list[_Scheduled]) -> torch.Tensor:
        tokens: list[int] = []
        logit_rows: list[int] = []
        for s in scheduled:
            draft_tokens = s.draft.tokens if s.draft else []
            s.first_row = len(tokens)
            tokens += s.chunk + draft_tokens
            if s.final:
                logit_rows += range(s.first_row + len(s.chunk) - 1, len(tokens))
        layout = self.model.layout(
            [s.request.slot for s in scheduled],
            [s.request.num_cached for s in scheduled],
            [len(s.chunk) + (len(s.draft.tokens) if s.draft else 0) for s in scheduled],
        )
        rows = torch.tensor(logit_rows, dtype=torch.long)  # empty when the step only feeds prompt chunks
        out = self.model(torch.tensor(tokens), layout, self.cache, rows, self.hidden_layers)
        self._features = out.hidden
        return out.logits

    def _observe(self, request: Request, first_row: int, num_rows: int) -> None:
        """Show observers the hidden states of rows just committed to the request's cache."""
        for observer in self.observers:
            rows = [
                self._features[layer][first_row : first_row + num_rows] for layer in observer.hidden_layers
            ]
            observer.observe(request, torch.cat(rows, dim=-1))

    def _verify_and_commit(self, finals: list[_Scheduled], logits: torch.Tensor) -> list[RequestOutput]:
        drafts = [s.draft.tokens if s.draft else [] for s in finals]
        lens = [len(d) for d in drafts]
        params = [s.request.params for s in finals]
        greedy = [p.greedy for p in params]
        # An all-greedy batch is decided by argmax alone: skip the vocabulary-wide softmax.
        target_probs = (
            logits if all(greedy) else processed_probs(logits, *params_tensors(params, [k + 1 for k in lens]))
        )
        draft_probs = None
        if not all(greedy) and any(s.draft is not None and s.draft.probs is not None for s in finals):
            vocab = logits.shape[-1]
            draft_probs = torch.cat(
                [_draft_distribution(s.draft, vocab) for s in finals if s.draft and s.draft.tokens]
            )
        result = verify(
            target_probs,
            torch.tensor([t for d in drafts for t in d], dtype=torch.long),
            lens,
            draft_probs,
            greedy,
            [s.request.generator for s in finals],
        )
        return [
            self._commit(s, k, a, new)
            for s, k, a, new in zip(finals, lens, result.accepted_counts, result.tokens, strict=True)
        ]

    def _commit(self, s: _Scheduled, drafted: int, accepted: int, new_tokens: list[int]) -> RequestOutput:
        r = s.request
        if s.draft is not None and s.draft.confidences is None and drafted:
            features = _estimator_features(r, s.draft)  # before this step's outcome joins the request's stats
            self.estimator.update(features, drafted, accepted, r.params.greedy)
        self._observe(r, s.first_row, len(s.chunk) + accepted)
        r.num_cached += len(s.chunk) + accepted  # the accepted drafts are cached; the new token is not
        self.cache.rollback(r.slot, r.num_cached)
        r.pending = [new_tokens[-1]]
        emitted = self._append_tokens(r, new_tokens)
        # Count accepted drafts that reach the output (not those past EOS): tau is what users get per step.
        accepted_in_output = min(accepted, len(emitted) - 1)
        r.stats.record(drafted, accepted_in_output)
        self.stats.record(drafted, accepted_in_output)
        self.last_step.spec.record(drafted, accepted_in_output)
        text, stopped = r.stop_matcher.feed(r.detokenizer.push(emitted))
        if stopped:
            r.finish_reason = "stop"
        elif r.finished:
            text += r.stop_matcher.feed(r.detokenizer.flush())[0] + r.stop_matcher.flush()
        if r.finished:
            self._release(r)
        return r.output(emitted, text)

    def _append_tokens(self, r: Request, new_tokens: list[int]) -> list[int]:
        """Append tokens up to EOS, max_tokens or the model length; sets the finish reason."""
        emitted = []
        for token in new_tokens:
            r.output_ids.append(token)
            emitted.append(token)
            if token in self.eos_ids and not r.params.ignore_eos:
                r.finish_reason = "stop"
            elif (
                r.remaining_tokens <= 0 or len(r.prompt_ids) + len(r.output_ids) >= self.config.max_model_len
            ):
                r.finish_reason = "length"
            if r.finished:
                break
        return emitted

    def _release(self, r: Request) -> None:
        if r.slot is not None:
            if self.prefix_cache is not None:  # a conversation's next turn resends this reply
                self.prefix_cache.store(self.cache, r.slot, r.prompt_ids + r.output_ids, r.num_cached)
            self.cache.free(r.slot)
            r.slot = None
        for observer in self.observers:
            observer.release(r)
        if self.proposer is not None and self.proposer not in self.observers:
            self.proposer.release(r)  # a stateful proposer that does not observe (a remote n-gram)

    # ---- conveniences -----------------------------------------------------------------------------------

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
    ) -> Iterator[RequestOutput]:
        """Run one request alone (with whatever else is queued) and yield its outputs as they come."""
        request_id = self.add_request(prompt, params, messages=messages)
        for out in self.run_until_done():
            if out.request_id == request_id:
                yield out

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Generate for all prompts with continuous batching; results in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        done = {i: Completion(request_id=i) for i in ids}
        for out in self.run_until_done():
            done[out.request_id].add(out)
        return [done[i] for i in ids]


@dataclass
class Completion:
    request_id: str
    token_ids: list[int] | None = None
    text: str = ""
    finish_reason: str | None = None
    spec: SpecSummary | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids = (self.token_ids or []) + out.token_ids
        self.text += out.text
        if out.finished:
            self.finish_reason, self.spec = out.finish_reason, out.spec
