"""What the front ends (gRPC, OpenAI HTTP) need of whatever runs their requests.

An `AsyncEngine` in the same process is one backend; the Ray Serve ingress's resuming client of the engine
replicas (`deployments/dspark_app.py`) is another. Both front ends take either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from pydantic import BaseModel

from dspark.engine import RequestOutput, ResumeState
from dspark.sampling import SamplingParams


class BackendInfo(BaseModel):
    """What ListModels reports of the engine."""

    proposer: str
    verification_policy: str
    max_model_len: int


class GenerationBackend(Protocol):
    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        speculate: bool = True,
        request_id: str | None = None,
        strict_max_tokens: bool = False,
        resume: ResumeState | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; refusals (InvalidRequestError, OverloadedError, UnavailableError)
        are raised before the first output."""
        ...

    @property
    def alive(self) -> bool:
        """Whether requests can be served now (what health probes report)."""
        ...

    def load(self) -> dict[str, int]:
        """Running and waiting requests."""
        ...

    def info(self) -> BackendInfo: ...
