"""API keys: ``Authorization: Bearer <key>`` over HTTP, the same metadata over gRPC.

As vLLM's ``--api-key``: with keys configured, the generation API (``/v1/*``,
``pdserve.v1.Generation``) wants one of them; health, metrics and reflection stay
open for probes. With none configured everything is open (the default binds to
127.0.0.1 only). Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import grpc


class ApiKeys:
    def __init__(self, keys: Sequence[str]):
        self._keys = [key.encode() for key in keys if key]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def refusal(self, authorization: str | None) -> str | None:
        """None when ``authorization`` (the header's value) carries a valid key, else why not."""
        if not self._keys:
            return None
        if not authorization:
            return "missing API key: send 'Authorization: Bearer <key>'"
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "malformed Authorization: expected 'Bearer <key>'"
        given = key.strip().encode()
        valid = False
        for known in self._keys:  # every key compared, so timing tells nothing about which one matched
            valid |= hmac.compare_digest(given, known)
        return None if valid else "invalid API key"

    async def admit_grpc(self, context: grpc.aio.ServicerContext) -> None:
        """Ends the call ``UNAUTHENTICATED`` unless its ``authorization`` metadata carries a valid key."""
        metadata = dict(context.invocation_metadata() or ())
        if refusal := self.refusal(metadata.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
