"""Validated generation requests, shared by the gRPC and HTTP front ends.

Both front ends turn their wire format into a `GenerationInput` (pydantic: the field named in every
error message is the client's field), so one set of rules decides what is a bad request; `parse` turns
any failure into the typed `InvalidRequestError` both front ends report.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspark.errors import InvalidRequestError
from dspark.sampling import SamplingParams


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationInput(BaseModel):
    """One generation: a raw prompt or chat messages, sampling parameters, and speculation on/off."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    sampling: SamplingParams = SamplingParams()
    speculation: bool = True
    request_id: str | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_input(self) -> GenerationInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    @classmethod
    def parse(cls, values: dict) -> GenerationInput:
        """Validate, raising InvalidRequestError that names the first offending field."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            # The one cross-field rule is about the input: name `prompt`, the field a client most often omits.
            raise InvalidRequestError.from_validation(err, model_field="prompt") from err

    def chat(self) -> list[dict] | None:
        return None if self.messages is None else [m.model_dump() for m in self.messages]
