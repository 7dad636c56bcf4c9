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
    def from_validation(cls, error: ValidationError, prefix: str = "") -> InvalidRequestError:
        """The first offending field of a pydantic error (all of them in the message)."""
        items = error.errors()
        fields = [".".join(str(p) for p in (prefix, *item["loc"]) if p != "") or "request" for item in items]
        message = "; ".join(
            f"{f}: {item['msg']}" if i else item["msg"]
            for i, (f, item) in enumerate(zip(fields, items, strict=True))
        )
        return cls(fields[0] if fields else (prefix or "request"), message)
