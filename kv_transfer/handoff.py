"""What a KV hand-off needs outside vLLM: the prefill worker's handle, the decode worker's settings, the names
both sides agree on.

vLLM-free (the engine's connector, ``vllm_connector.py``, and the simulated engine's, ``sim_connector.py``,
both use it, and so do the worker deployments), so a simulated worker never imports vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from kv_transfer.errors import (
    TransferDenied,
    TransferError,
    TransferIntegrityError,
    TransferLayoutError,
    TransferNotFound,
    TransferRequestError,
    TransferTimeout,
    TransferUnavailable,
    TransferVersionError,
)
from kv_transfer.transfer import KVFingerprint, SenderRank, TransferHandle

log = logging.getLogger(__name__)

TOKEN_ENV = "PDSERVE_CLUSTER_TOKEN"
DEFAULT_LEASE_S = 30.0  # how long an offer nobody renews or releases holds its blocks
PULLED_TOKENS_KEY = "pdserve_pulled_tokens"  # in a consumer's final kv_transfer_params: prompt tokens loaded
DEFAULT_PULL_TIMEOUT_S = 600.0  # a whole pull, a long chunked prefill included (stalls fail it sooner)


@dataclass
class SenderInfo:
    """What one rank's worker side tells the scheduler side once its KV caches exist."""

    address: str
    first_head: int
    num_heads: int
    fingerprint: KVFingerprint
    backends: tuple[str, ...]  # the channels it serves

    @classmethod
    def from_dict(cls, data: dict) -> SenderInfo:
        """From ``dataclasses.asdict`` of one (it crosses vLLM's ``collective_rpc`` as a dict)."""
        fingerprint = {**data["fingerprint"], "head_shape": tuple(data["fingerprint"]["head_shape"])}
        return cls(
            data["address"], data["first_head"], data["num_heads"], KVFingerprint(**fingerprint),
            tuple(data["backends"]),
        )  # fmt: skip


def block_digests(params: dict, count: int) -> list[bytes]:
    """The first ``count`` block digests the request carries, padded (a trailing partial block has none)."""
    try:
        hashes = [bytes.fromhex(h) for h in params.get("block_hashes", [])][:count]
    except (TypeError, ValueError):
        hashes = []
    return hashes + [b""] * (count - len(hashes))


def transfer_handle(
    senders: list[SenderInfo], block_size: int, transfer_id: str, block_hashes: list[str], num_tokens: int
) -> str:
    """The handle (hex) of a transfer the ranks ``senders`` offer, or will offer: the prefill worker hands it out
    up front, from the handshakes its engine's ranks made (``Engine.kv_connector_handshake``), with no call into
    vLLM."""
    hashes = block_digests({"block_hashes": block_hashes}, -(-num_tokens // block_size))
    ranks = tuple(SenderRank(s.address, s.first_head, s.num_heads) for s in senders)
    handle = TransferHandle(transfer_id, tuple(hashes), num_tokens, senders[0].fingerprint, ranks, senders[0].backends)
    return handle.to_bytes().hex()


def usable_handle(request_id: str, params: dict, model_id: str) -> TransferHandle | None:
    """A ``consume`` request's handle (``params``: its ``kv_transfer_params``), or None where it cannot be used,
    and the request prefills locally: unreadable, of another model, or of another prompt's blocks (the full
    KV fingerprint is compared by each rank before it pulls)."""
    try:
        handle = TransferHandle.from_bytes(bytes.fromhex(params["handle"]))
    except (KeyError, TypeError, ValueError, DecodeError, TransferError) as exc:
        log.warning("request %s: unusable KV handle, prefilling locally: %s", request_id, exc)
        return None
    if handle.model_id != model_id:
        log.warning("request %s: handle is for model %r, not %r", request_id, handle.model_id, model_id)
        return None
    ours = params.get("block_hashes") or []
    theirs = [h.hex() for h in handle.block_hashes[: len(ours)]]
    if ours[: len(theirs)] != theirs:  # the offered KV is of another prompt: never load it
        log.warning("request %s: the handle's blocks are not this prompt's", request_id)
        return None
    return handle


@dataclass(frozen=True)
class KVTLS:
    certificate: bytes
    key: bytes
    ca: bytes


def kv_tls(extra: dict) -> KVTLS | None:
    """TLS for KV from the connector's config (``tls_cert_file``, ``tls_key_file``, ``tls_ca_file``), or None."""
    names = ("tls_cert_file", "tls_key_file", "tls_ca_file")
    if not any(extra.get(name) for name in names):
        return None
    missing = [name for name in names if not extra.get(name)]
    if missing:
        raise ValueError(f"TLS for KV needs {', '.join(missing)} too")
    return KVTLS(*(Path(extra[name]).read_bytes() for name in names))


def failure_cause(exc: BaseException) -> str:
    """The ``cause`` label of a failed load (``pdserve:kv_transfer_failures_total{cause}``)."""
    causes = {
        TransferLayoutError: "incompatible", TransferVersionError: "incompatible", TransferTimeout: "timeout",
        TransferIntegrityError: "integrity", TransferNotFound: "not_found", TransferUnavailable: "unavailable",
        TransferDenied: "denied", TransferRequestError: "bad_request",
    }  # fmt: skip
    return next((cause for kind, cause in causes.items() if isinstance(exc, kind)), "other")
