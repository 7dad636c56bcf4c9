"""Optional API keys, checked once for every front end (in-process apps and the Ray Serve deployment).

A client presents the key as `authorization: Bearer KEY` (HTTP header or gRPC metadata) or `x-api-key: KEY`.
Keys are compared in constant time. With no key configured, every request is allowed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from dspark.errors import AuthenticationError

Headers = Mapping[str, str] | Iterable[tuple[str, str | bytes]]


class ApiKeyCheck:
    def __init__(self, api_key: str | None) -> None:
        self._key = api_key.encode() if api_key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def allows(self, headers: Headers) -> bool:
        """Whether HTTP headers or gRPC invocation metadata carry the key."""
        if self._key is None:
            return True
        items = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in items:
            if isinstance(value, bytes):  # binary (`-bin`) gRPC metadata never carries the key
                continue
            name = name.lower()
            if name == "authorization":
                scheme, _, token = value.strip().partition(" ")
                presented = token.strip() if scheme.lower() == "bearer" else ""
            elif name == "x-api-key":
                presented = value.strip()
            else:
                continue
            if hmac.compare_digest(presented.encode(), self._key):
                return True
        return False

    def check(self, headers: Headers) -> None:
        """Raise AuthenticationError unless the headers or metadata carry the key."""
        if not self.allows(headers):
            raise AuthenticationError(
                "missing or invalid API key: send `authorization: Bearer <key>` (or `x-api-key: <key>`)"
            )
