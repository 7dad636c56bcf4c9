"""A request's state inside the engine, and what the engine reports for it each step."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field

from dspark.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dspark.engine.stats import SpecStats, SpecSummary
from dspark.sampling import SamplingParams, make_generator

FinishReason = Literal["stop", "length", "abort"]
_request_ids = itertools.count()


class RequestOutput(BaseModel):
    """The delta one step produced for a request; the last one has `finished` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    spec: SpecSummary | None = None  # speculation summary, on the final output


class ResumeState(BaseModel):
    """What the client already received of a request resumed after a fault: its output tokens are
    re-prefilled after the prompt and count as output; text already sent is not sent again."""

    output_ids: list[int] = Field(min_length=1)
    text_chars: int = Field(ge=0, description="characters of text the client already received")


class Request:
    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        tokenizer,
        request_id: str | None = None,
        speculate: bool = True,
        resume: ResumeState | None = None,
    ) -> None:
        self.request_id = request_id if request_id is not None else f"req-{next(_request_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = list(resume.output_ids) if resume is not None else []
        self.params = params
        self.speculate = speculate
        self.generator: torch.Generator | None = make_generator(params.seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stop_matcher = StopStringMatcher(params.stop)
        self.stats = SpecStats()
        self.slot: int | None = None
        self.num_cached = 0  # positions of this request in its KV-cache slot
        self.pending: list[int] = self.prompt_ids + self.output_ids  # tokens not yet in the cache
        self.finish_reason: FinishReason | None = None
        self._unsent_text = ""
        if resume is not None:  # replay the sent tokens: detokenizer and stop matcher resume mid-stream
            replayed, _ = self.stop_matcher.feed(self.detokenizer.push(self.output_ids))
            self._unsent_text = replayed[resume.text_chars :]

    def reseed(self) -> None:
        """A seeded request draws each step's randomness from a stream fixed by (seed, output position), so
        a request resumed elsewhere continues the stream an uninterrupted run would have used."""
        if self.generator is not None and self.params.seed is not None:
            mixed = (self.params.seed * 0x9E3779B97F4A7C15 + len(self.output_ids)) % (1 << 63)
            self.generator.manual_seed(mixed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def output(self, new_ids: list[int], text: str) -> RequestOutput:
        text, self._unsent_text = self._unsent_text + text, ""
        return RequestOutput(
            request_id=self.request_id,
            token_ids=new_ids,
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_ids),
            num_output_tokens=len(self.output_ids),
            spec=self.stats.summary() if self.finished else None,
        )
