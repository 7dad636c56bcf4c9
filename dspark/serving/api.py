"""Validated generation requests, shared by the gRPC and HTTP front ends.

Both front ends turn their wire format into a `GenerationInput` (pydantic: the field named in every
error message is the client's field), so one set of rules decides what is a bad request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspark.sampling import SamplingParams


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationInput(BaseModel):
    """One generation: a raw prompt or chat messages, sampling parameters, and speculation on/off."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = SamplingParams()
    speculation: bool = True
    request_id: str | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_input(self) -> GenerationInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self

    def chat(self) -> list[dict] | None:
        return None if self.messages is None else [m.model_dump() for m in self.messages]


def describe(error: ValidationError) -> str:
    """A one-line message naming each offending field, e.g. `sampling.temperature: must be >= 0`."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "request"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)
