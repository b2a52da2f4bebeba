"""The simulated engine's output: token ids that are a seeded function of the context, so outputs are checkable.

Each token is a function of every token before it, prompt and output, as a real model's greedy output is:
greedy (temperature 0) gives one sequence per prompt on every worker, and a stream resumed elsewhere from
its prompt and the tokens it already had goes on with the tokens it would have had. Sampling with a seed
gives that seed's sequence, without one a fresh sequence each time.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import xxhash

from engine.types import SamplingOptions


def sampling_salt(options: SamplingOptions) -> int:
    """0 for greedy; for seeded sampling, a stream per seed and sampling settings; a random one otherwise."""
    if options.temperature == 0:
        return 0
    if options.seed is None:
        return random.getrandbits(63) + 1
    settings = struct.pack("<qdddq", options.seed, options.temperature, options.top_p, options.min_p, options.top_k)
    return xxhash.xxh3_64_intdigest(settings) | 1


class Continuation:
    """The tokens that follow ``context``, one at a time; the context hash is kept running, so a token costs
    the same at any length."""

    def __init__(self, context: Sequence[int], salt: int, vocab_size: int):
        self._hash = xxhash.xxh3_128(struct.pack(f"<{len(context)}I", *context))
        self._salt = struct.pack("<Q", salt)
        self._vocab_size = vocab_size

    def next_token(self) -> int:
        token = xxhash.xxh3_64_intdigest(self._hash.digest() + self._salt) % self._vocab_size
        self._hash.update(struct.pack("<I", token))
        return token
