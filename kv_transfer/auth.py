"""The cluster token: peers prove they belong to the cluster before any byte moves.

A caller sends ``HMAC-SHA256(secret, transfer_id)`` as gRPC metadata; the secret
itself never crosses the wire, and a proof for one transfer opens no other.
"""

from __future__ import annotations

import hashlib
import hmac

METADATA_KEY = "x-pdserve-proof"


def proof(secret: str, transfer_id: str) -> str:
    return hmac.new(secret.encode(), transfer_id.encode(), hashlib.sha256).hexdigest()


def verify(secret: str, transfer_id: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(proof(secret, transfer_id), presented)
