"""Typed transfer failures: each carries the transfer id, and maps to one gRPC status."""

from __future__ import annotations

import grpc


class TransferError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, transfer_id: str, message: str):
        self.transfer_id = transfer_id
        super().__init__(f"transfer {transfer_id}: {message}")


class TransferNotFound(TransferError):
    """Unknown, or already released / aborted / expired."""

    code = grpc.StatusCode.NOT_FOUND


class TransferDenied(TransferError):
    """The peer did not prove it belongs to the cluster."""

    code = grpc.StatusCode.PERMISSION_DENIED


class TransferVersionError(TransferError):
    """The peer speaks another wire version (older or newer): nothing is moved, the receiver recomputes."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TransferLayoutError(TransferError):
    """Both ends must agree on dtype, block shape, layer count and cache layout (checked by the receiver)."""


class TransferRequestError(TransferError):
    """A pull that asks for blocks or layers the transfer does not have."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TransferTimeout(TransferError):
    """No progress within the deadline: the peer stalled or died."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class TransferIntegrityError(TransferError):
    """A chunk's checksum or length did not match: its blocks are discarded."""

    code = grpc.StatusCode.DATA_LOSS


class TransferUnavailable(TransferError):
    """The peer cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


# What a receiver raises for the status a sender answered with.
BY_CODE: dict[grpc.StatusCode, type[TransferError]] = {
    cls.code: cls
    for cls in (
        TransferNotFound, TransferDenied, TransferVersionError, TransferRequestError,
        TransferTimeout, TransferIntegrityError, TransferUnavailable,
    )
}  # fmt: skip
