"""Benchmark workloads: sessions of token-id prompts, every random choice drawn from one seed.

A workload is a list of sessions; a session is a list of turns run one after
another (a turn starts when the previous one has finished). Single-shot
workloads have one turn per session; ``multi-turn`` conversations extend
their previous turn, answer included, so every turn after the first shares
its whole history as a cached prefix. Prompts are token ids, so no tokenizer
decides their length.

- ``random``:        input and output lengths drawn uniformly around their means
- ``shared-prefix``: system prompts drawn Zipf(s), each request one of them plus its own question
- ``multi-turn``:    conversations of several turns, each turn the history plus a new message
- ``long-doc``:      a few long documents, short answers
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: list[list[Turn]]

    @property
    def requests(self) -> int:
        return sum(len(session) for session in self.sessions)


@dataclass(frozen=True)
class WorkloadSpec:
    """Every knob of every workload; each workload reads the ones it needs."""

    name: str = "random"
    requests: int = 64
    input_tokens: int = 512
    output_tokens: int = 64
    spread: float = 0.5  # lengths are drawn from mean × [1 - spread, 1 + spread]
    system_prompts: int = 16
    system_prompt_tokens: int = 1024
    zipf_s: float = 1.1
    turns: int = 4
    documents: int = 4
    document_tokens: int = 1536
    seed: int = 0


def make_workload(spec: WorkloadSpec, vocab_size: int) -> Workload:
    if spec.name not in WORKLOADS:
        raise ValueError(f"unknown workload {spec.name!r} (known: {', '.join(WORKLOADS)})")
    return Workload(spec.name, WORKLOADS[spec.name](spec, _Draw(random.Random(spec.seed), vocab_size)))


class _Draw:
    def __init__(self, rng: random.Random, vocab_size: int):
        self.rng = rng
        self._vocab = vocab_size

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(2, self._vocab) for _ in range(n)]

    def length(self, mean: int, spread: float) -> int:
        return max(1, round(mean * self.rng.uniform(1 - spread, 1 + spread)))


def _random(spec: WorkloadSpec, draw: _Draw) -> list[list[Turn]]:
    return [
        [Turn(draw.tokens(draw.length(spec.input_tokens, spec.spread)), draw.length(spec.output_tokens, spec.spread))]
        for _ in range(spec.requests)
    ]


def _shared_prefix(spec: WorkloadSpec, draw: _Draw) -> list[list[Turn]]:
    heads = [draw.tokens(spec.system_prompt_tokens) for _ in range(spec.system_prompts)]
    weights = [1.0 / (k + 1) ** spec.zipf_s for k in range(len(heads))]
    return [
        [Turn(draw.rng.choices(heads, weights)[0] + draw.tokens(spec.input_tokens), spec.output_tokens)]
        for _ in range(spec.requests)
    ]


def _multi_turn(spec: WorkloadSpec, draw: _Draw) -> list[list[Turn]]:
    """``requests`` turns in all, ``turns`` per conversation; each turn is the history, the answer, a new message."""
    sessions = []
    for _ in range(max(1, spec.requests // spec.turns)):
        history: list[int] = []
        turns = []
        for _ in range(spec.turns):
            history = history + draw.tokens(draw.length(spec.input_tokens, spec.spread))
            turns.append(Turn(history, spec.output_tokens))
            history = history + draw.tokens(spec.output_tokens)  # stands for the answer, as a client would resend it
        sessions.append(turns)
    return sessions


def _long_doc(spec: WorkloadSpec, draw: _Draw) -> list[list[Turn]]:
    documents = [draw.tokens(spec.document_tokens) for _ in range(spec.documents)]
    return [
        [Turn(draw.rng.choice(documents) + draw.tokens(32), max(1, spec.output_tokens // 4))]
        for _ in range(spec.requests)
    ]


WORKLOADS = {"random": _random, "shared-prefix": _shared_prefix, "multi-turn": _multi_turn, "long-doc": _long_doc}
