"""pdserve's block hash: one chained scheme every machine in the cluster agrees on.

The prefix index is keyed by these hashes, so the router (which never loads
torch) and every worker (which derive them from vLLM's KV events) must compute
the same bytes. vLLM's own block hashes are not usable for that: their seed
changes from process to process unless pinned.

Scheme, version ``SCHEME_VERSION`` (pinned by a test vector in
``tests/test_block_hash.py``; change it and the version together):

- Algorithm: XXH3-128 (``xxhash.xxh3_128``, seed 0), digest as 16 big-endian bytes.
- Root: ``H(b"pdserve-block-hash\\x00" + u32le(SCHEME_VERSION) + utf8(model_id))``.
- Block ``i`` (``block_size`` tokens, only full blocks are hashed):
  ``h_i = H(h_{i-1} + u32le(t_0) + u32le(t_1) + ...)`` with ``h_{-1} = root``.
- Token ids are packed as unsigned 32-bit little-endian integers.
- Text form (Redis keys, logs): the 32-character lowercase hex of the digest.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache

import xxhash

SCHEME_VERSION = 1
_ROOT_PREFIX = b"pdserve-block-hash\x00"
_MAX_TOKEN_ID = 2**32 - 1


@lru_cache(maxsize=64)
def root_hash(model_id: str) -> bytes:
    """The chain's seed: equal for one model everywhere, different between models."""
    return xxhash.xxh3_128_digest(_ROOT_PREFIX + struct.pack("<I", SCHEME_VERSION) + model_id.encode("utf-8"))


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Hash one block of token ids chained onto its parent's digest."""
    return xxhash.xxh3_128_digest(parent + _pack(tokens))


def hash_chain(model_id: str, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Digests of every full block of ``token_ids``; a trailing partial block is not hashed."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    full = len(token_ids) // block_size * block_size
    packed = _pack(token_ids[:full])  # one pack for the whole prompt: the router hashes on its hot path
    step = 4 * block_size
    digest = xxhash.xxh3_128_digest
    parent = root_hash(model_id)
    chain = []
    for offset in range(0, len(packed), step):
        parent = digest(parent + packed[offset : offset + step])
        chain.append(parent)
    return chain


def _pack(tokens: Sequence[int]) -> bytes:
    """Token ids as consecutive unsigned 32-bit little-endian integers."""
    try:
        packed = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]") from exc
    if packed.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte C unsigned int
        return struct.pack(f"<{len(tokens)}I", *tokens)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()
