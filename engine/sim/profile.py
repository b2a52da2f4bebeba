"""Hardware profiles of the simulated engine: how long one step takes, and how fast KV crosses the link.

A step runs ``P`` prompt tokens (chunked prefill) and ``S`` decoding sequences holding ``C`` tokens of
context between them. Its time is

    step_ms = base_ms + (prefill_step_ms if P else 0)
                      + prefill_ms_per_token * P + prefill_ms_per_token2 * P**2
                      + prefill_ms_per_context_pair * X
                      + decode_ms_per_seq * S + decode_ms_per_context_token * C

the form Dynamo's mocker fits (its prefill curve is quadratic in the tokens of the step, with a constant
of its own; its decode step grows with the batch and with the KV it reads), plus what a prompt's tokens
pay to attend to the context already in the cache before them (a prefix-cache hit, an earlier chunk):
``X`` is the sum over the step's prompts of their tokens computed times the tokens cached before them.
Without it, a prompt whose long shared prefix was a hit would cost as little as a fresh prompt of its
suffix alone. ``prefill_step_ms`` is what a step that computes any prompt token costs beyond a decode
step: on vLLM-CPU, 16 prompt tokens alone took 20 ms where one decoding sequence's step took 9.3 ms
(2026-12-01, the bench model); one constant for both overstated every decode step by 40 %.

A request spends ``request_ms`` in its worker outside the steps, before it reaches the scheduler: what a
worker's vLLM front end costs each request on its way in (input processing, the hop to the engine core) and
its first token on its way out, on cores the serving processes share. Through a service on this machine the
decode worker's own time to a prefix hit's first token was 10-20 ms longer than its step (2026-12-04); a
profile measured through a service carries it (``bench/engine_profile.py``), a named one from published step
times has none.

A hand-off of ``T`` prompt tokens takes ``T * kv_bytes_per_token / link_bytes_per_s`` on top of the prefill
worker's step.

A profile is named (``PROFILES``) or read from a JSON file with the same fields (what ``pdserve bench
simulator`` measures on this machine). Each carries ``source``: where its figures come from.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    source: str
    base_ms: float
    prefill_ms_per_token: float
    prefill_ms_per_token2: float
    decode_ms_per_seq: float
    decode_ms_per_context_token: float
    kv_bytes_per_token: int
    link_bytes_per_s: float
    prefill_ms_per_context_pair: float = 0.0  # per prompt token x token of context cached before it
    prefill_step_ms: float = 0.0  # a step with prompt tokens in it, beyond what a decode step costs
    request_ms: float = 0.0  # each request's time in its worker outside the steps, before it is scheduled

    def __post_init__(self):
        numbers = [f.name for f in fields(self) if f.name not in ("name", "source")]
        negative = [name for name in numbers if getattr(self, name) < 0]
        if negative or self.link_bytes_per_s <= 0:
            raise ValueError(f"profile {self.name}: {', '.join(negative) or 'link_bytes_per_s'} must be positive")

    def step_s(
        self, prefill_tokens: int, decode_seqs: int, context_tokens: int, prefill_context_pairs: int = 0
    ) -> float:
        ms = (
            self.base_ms
            + (self.prefill_step_ms if prefill_tokens else 0.0)
            + self.prefill_ms_per_token * prefill_tokens
            + self.prefill_ms_per_token2 * prefill_tokens**2
            + self.prefill_ms_per_context_pair * prefill_context_pairs
            + self.decode_ms_per_seq * decode_seqs
            + self.decode_ms_per_context_token * context_tokens
        )
        return ms / 1000.0

    @property
    def request_s(self) -> float:
        return self.request_ms / 1000.0

    def transfer_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


PROFILES = {
    profile.name: profile
    for profile in (
        HardwareProfile(
            name="llama-3.1-8b-h100",
            source=(
                "prefill: Dynamo's mocker default fit (lib/mocker/src/common/perf_model.rs: "
                "4.21e-7*T^2 + 1.518e-2*T + 16.5 ms, its constant replaced by the step base below); "
                "decode: NVIDIA NIM's published Llama-3.1-8B-Instruct "
                "H100 figures, ITL 4.6 ms at 1 concurrent request and 7.6 ms at 100 (1k in, 1k out: ~1.5k "
                "tokens of context each), fitted as 4.5 ms + 2e-5 ms per token of context; KV: 32 layers x 8 KV "
                "heads x 128 x 2 (K, V) x 2 bytes = 128 KiB per token; link: 25 GB/s (one 200 Gb/s NIC per GPU)"
            ),
            base_ms=4.5,
            prefill_ms_per_token=1.518e-2,
            prefill_ms_per_token2=4.21e-7,
            decode_ms_per_seq=0.0,
            decode_ms_per_context_token=2e-5,
            kv_bytes_per_token=131072,
            link_bytes_per_s=25e9,
        ),
    )
}

DEFAULT_PROFILE = "llama-3.1-8b-h100"


def load_profile(name_or_path: str) -> HardwareProfile:
    """A named profile, or one from a JSON file (every field of ``HardwareProfile``; a term added since a
    file was written may be missing from it, and is then 0)."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"no hardware profile {name_or_path!r}: neither one of {sorted(PROFILES)} nor a JSON file")
    data = json.loads(path.read_text())
    required = {f.name for f in fields(HardwareProfile) if f.default is MISSING}  # later terms default to 0
    missing = required - data.keys()
    if missing:
        raise ValueError(f"hardware profile {path}: missing {', '.join(sorted(missing))}")
    return HardwareProfile(**data)
