"""The simulated engine's output: token ids that are a seeded function of the prompt, so outputs are checkable.

Greedy (temperature 0) gives one sequence per prompt on every worker, as a real model's greedy output
would; sampling with a seed gives that seed's sequence, without one a fresh sequence each time.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import xxhash

from engine.types import SamplingOptions


def prompt_key(prompt_token_ids: Sequence[int]) -> bytes:
    return xxhash.xxh3_128_digest(struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids))


def sampling_salt(options: SamplingOptions) -> int:
    """0 for greedy; for seeded sampling, a stream per seed and sampling settings; a random one otherwise."""
    if options.temperature == 0:
        return 0
    if options.seed is None:
        return random.getrandbits(63) + 1
    settings = struct.pack("<qdddq", options.seed, options.temperature, options.top_p, options.min_p, options.top_k)
    return xxhash.xxh3_64_intdigest(settings) | 1


def output_token(key: bytes, position: int, salt: int, vocab_size: int) -> int:
    """The token at output ``position`` (0: the first) of the prompt whose key is ``key``."""
    return xxhash.xxh3_64_intdigest(key + struct.pack("<QQ", position, salt)) % vocab_size
