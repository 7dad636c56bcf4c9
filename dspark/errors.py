"""The typed error for a request the engine or a front end refuses, naming the client's field."""

from __future__ import annotations

from pydantic import ValidationError


class InvalidRequestError(ValueError):
    """Bad input: `field` is the request field at fault (dotted for nested ones), `message` says why.

    Both front ends map it to their status (HTTP 400 with OpenAI's `param`, gRPC INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:
        # Ray Serve pickles a replica's exception to its proxy; rebuild from both fields, not str(self).
        return type(self), (self.field, self.message)

    @classmethod
    def from_validation(
        cls, error: ValidationError, prefix: str = "", model_field: str = "request"
    ) -> InvalidRequestError:
        """The first offending field of a pydantic error (all of them in the message); an error of the model
        as a whole (a cross-field rule) names `model_field`."""
        items = error.errors()
        fields = [
            ".".join(str(p) for p in (prefix, *item["loc"]) if p != "") or model_field for item in items
        ]
        message = "; ".join(
            f"{f}: {item['msg']}" if i else item["msg"]
            for i, (f, item) in enumerate(zip(fields, items, strict=True))
        )
        return cls(fields[0] if fields else (prefix or model_field), message)


class OverloadedError(RuntimeError):
    """The server is at capacity (its running batch and bounded queue are full); the request was refused at
    once. Front ends map it to HTTP 429 with `Retry-After` and gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(f"{message}; retry after {retry_after_s} s")
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.retry_after_s)


class AuthenticationError(PermissionError):
    """A missing or wrong API key: HTTP 401, gRPC UNAUTHENTICATED."""


class UnavailableError(RuntimeError):
    """Nothing can serve the request now (the engine loop stopped, or no replica took it over within the
    retry timeout): HTTP 503, gRPC UNAVAILABLE."""
