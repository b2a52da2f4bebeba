"""The hand-made Chunk encoding is the protobuf encoding, byte for byte."""

import pytest

from kv_transfer.chunk_codec import decode_chunk, encode_chunk
from pdserve_pb.v1 import kv_transfer_pb2 as pb

HEADER = pb.ChunkHeader(transfer_id="t", layer=3, part=pb.KV_PART_KV, byte_offset=4096, byte_length=300, xxh3_64=2**63)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000])
def test_encoding_equals_protobuf(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_chunk(HEADER, memoryview(data)) == pb.Chunk(header=HEADER, data=data).SerializeToString()


def test_decoding_reads_what_protobuf_wrote():
    header, data = decode_chunk(pb.Chunk(header=HEADER, data=b"payload").SerializeToString())
    assert header == HEADER and bytes(data) == b"payload"


def test_a_truncated_chunk_is_refused():
    with pytest.raises(ValueError, match="truncated"):
        decode_chunk(encode_chunk(HEADER, b"payload")[:-3])
