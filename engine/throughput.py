"""What a worker sustains and what its requests look like, measured as it serves, for the autoscaler.

The coordinated autoscaling policy sizes the prefill pool against the decode
pool from these: prompt tokens per second a replica computes *while it has work*
(idle time would make a lightly loaded pool look slow), tokens per second of one
decoding sequence (a decode replica's throughput grows with its batch, so what it
sustains is this times the batch it is meant to hold), and the mean prompt and
output lengths. Both forget the past with a time constant of
``window_s``, so a change of workload shows within a window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class BusyRate:
    """Tokens per busy second: time counts only while at least one request is in progress, and with
    ``per_request`` once for each request in progress (tokens per second of one request)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic, per_request: bool = False):
        self._window_s = window_s
        self._clock = clock
        self._per_request = per_request
        self._tokens = 0.0
        self._busy_s = 0.0
        self._active = 0
        self._at = clock()

    def begin(self) -> None:
        self._advance()
        self._active += 1

    def end(self) -> None:
        self._advance()
        self._active = max(self._active - 1, 0)

    def add(self, tokens: int) -> None:
        self._advance()
        self._tokens += tokens

    def rate(self) -> float | None:
        """None until a full second of work has been seen: no figure is better than a wild one."""
        self._advance()
        return self._tokens / self._busy_s if self._busy_s >= 1.0 else None

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._at
        if self._active:
            self._busy_s += elapsed * (self._active if self._per_request else 1)
        decay = math.exp(-elapsed / self._window_s)
        self._tokens *= decay
        self._busy_s *= decay
        self._at = now


class TokensPerRequest:
    """Tokens per request over the last ``window_s`` (both decaying with that time constant): a request is
    counted when it begins, its tokens as they come.

    By flow, not on completion: a burst of long generations shows as soon as their tokens stream, where a
    mean of finished lengths would wait for the first of them to end (a 256-token stream at ~10 tokens/s:
    25 s in which the coordinated policy sized the prefill pool for the old, short outputs). In a steady
    state the two agree (tokens per second over requests per second). Decaying in time rather than per
    request, a replica that sees few requests forgets the old mix as fast as one that sees many."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._requests = 0.0
        self._tokens = 0.0
        self._at = clock()

    def begin(self) -> None:
        self._advance()
        self._requests += 1

    def add(self, tokens: int) -> None:
        self._advance()
        self._tokens += tokens

    @property
    def value(self) -> float | None:
        """None until a request has begun."""
        self._advance()
        return self._tokens / self._requests if self._requests else None

    def _advance(self) -> None:
        now = self._clock()
        decay = math.exp(-(now - self._at) / self._window_s)
        self._requests *= decay
        self._tokens *= decay
        self._at = now
