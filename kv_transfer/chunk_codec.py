"""The ``Chunk`` message, encoded and decoded by hand around its payload.

Byte-for-byte the protobuf encoding of ``pdserve.v1.Chunk`` (field 1: header,
field 2: data, both length-delimited), so any protobuf peer reads it; done by
hand because going through the message object copies every payload twice more
(into the message, then into its serialization) on each side.
"""

from __future__ import annotations

from pdserve_pb.v1 import kv_transfer_pb2 as pb

_HEADER_TAG, _DATA_TAG = 0x0A, 0x12  # (field 1 | 2) << 3 | wire type 2 (length-delimited)


def encode_chunk(header: pb.ChunkHeader, data) -> bytes:
    """One copy of ``data`` (any bytes-like object, e.g. a memoryview of the KV cache)."""
    head = header.SerializeToString()
    parts = [bytes((_HEADER_TAG,)), _varint(len(head)), head]
    if len(data):  # proto3 leaves an empty bytes field out
        parts += [bytes((_DATA_TAG,)), _varint(len(data)), data]
    return b"".join(parts)


def decode_chunk(message: bytes) -> tuple[pb.ChunkHeader, memoryview]:
    """The header, and the payload as a view into ``message`` (no copy)."""
    view = memoryview(message)
    header, data, position = pb.ChunkHeader(), view[:0], 0
    while position < len(view):
        tag, position = _read_varint(view, position)
        if tag & 0x7 != 2:
            raise ValueError(f"chunk field {tag >> 3} has wire type {tag & 0x7}, expected length-delimited")
        length, position = _read_varint(view, position)
        field = view[position : position + length]
        if len(field) != length:
            raise ValueError("chunk is truncated")
        if tag == _HEADER_TAG:
            header.ParseFromString(field)
        elif tag == _DATA_TAG:
            data = field
        position += length
    return header, data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(view):
            raise ValueError("chunk is truncated")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
