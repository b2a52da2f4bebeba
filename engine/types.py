"""Typed values that cross the engine's interface; plain data, no torch or vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # stop tokens and strings held off until this many are generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    allowed_token_ids: tuple[int, ...] | None = None  # None: every token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's, in the text (and so the stop strings' matching) of special tokens kept; set by vLLM's gRPC API only
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None  # each output token's log-probability and this many alternatives; None: none
    structured: StructuredOutput | None = None  # the output constrained to a JSON schema, a regex, ...
    bad_words: tuple[str, ...] = ()  # words never generated (vLLM bans their tokens, with and without a space)
    prompt_logprobs: int | None = None  # each prompt token's log-probability and this many alternatives
    tool_use: ToolUse | None = None  # a chat's tools: the output is read for tool calls (engine/tool_calls.py)


@dataclass(frozen=True)
class StructuredOutput:
    """vLLM's structured outputs: exactly one constraint, run by the worker's vLLM as it samples."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
    spec: str | tuple[str, ...] | None = None  # the JSON schema (as JSON text), regex, choices, grammar or tag


@dataclass(frozen=True)
class ToolUse:
    """A chat's tools as OpenAI's API gives them, for the worker's vLLM to constrain and read the output by."""

    tools_json: str  # the request's ``tools`` list, as JSON text
    choice: str = "auto"  # "none", "auto", "required", or the name of the one function to call
    named: bool = False  # ``choice`` names a function
    parallel_tool_calls: bool = True  # false: at most one call (vLLM keeps the first)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call, as OpenAI streams them: the call's first piece has its id and name, the
    rest only more of its arguments (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability, and the most likely tokens at its position (most likely first)."""

    token_id: int
    token: str  # the token's text as vLLM decodes it
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, log-probability)
    rank: int | None = None  # the token's rank in the vocabulary at its position (1: the likeliest)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions = SamplingOptions()
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(frozen=True)
class OutputDelta:
    """What one engine step added to one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it (vLLM's)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token in ``token_ids``, when asked for
    # On the last delta of a decode that took KV from a prefill worker: the prompt tokens whose KV it loaded
    # (counted in ``cached_prompt_tokens`` too, as vLLM counts them: not computed here, but not cached either).
    kv_pulled_tokens: int = 0
    # On the first delta, when asked for: one per prompt token, None for the first (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # A chat with tools: the tool-call pieces this step added (``text`` is then the content around them).
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # On a worker's first delta: seconds from the request reaching the worker to this delta, as the worker
    # measured it (its queue, the prompt computed or its KV pulled, the first step): the worker's share of TTFT.
    worker_first_delta_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, later: list[OutputDelta]) -> OutputDelta:
        """This delta and the ones after it of the same request as one (counts are running totals)."""
        last = later[-1]
        return OutputDelta(
            request_id=self.request_id,
            token_ids=[t for delta in (self, *later) for t in delta.token_ids],
            text="".join(delta.text for delta in (self, *later)),
            finish_reason=last.finish_reason,
            prompt_tokens=self.prompt_tokens or last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            kv_transfer_params=next((d.kv_transfer_params for d in reversed(later) if d.kv_transfer_params),
                                    self.kv_transfer_params),
            stop_reason=last.stop_reason,
            logprobs=None if self.logprobs is None else tuple(t for d in (self, *later) for t in d.logprobs or ()),
            kv_pulled_tokens=last.kv_pulled_tokens,
            prompt_logprobs=self.prompt_logprobs,
            tool_calls=_joined(call for delta in (self, *later) for call in delta.tool_calls),
            worker_first_delta_s=self.worker_first_delta_s,
        )  # fmt: skip


def _joined(pieces) -> tuple[ToolCallDelta, ...]:
    """Consecutive pieces of one call as one (its id and name, their arguments in order), as OpenAI streams
    one piece per call in a delta."""
    joined: list[ToolCallDelta] = []
    for piece in pieces:
        if joined and joined[-1].index == piece.index:
            last = joined[-1]
            piece = ToolCallDelta(last.index, last.id or piece.id, (last.name or "") + (piece.name or "") or None,
                                  last.arguments + piece.arguments)  # fmt: skip
            joined[-1] = piece
        else:
            joined.append(piece)
    return tuple(joined)


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_total: int
    kv_blocks_free: int
    running: int
    waiting: int
    awaiting_kv: int  # of the waiting, those admitted whose KV is on its way from a prefill worker
    prompt_tokens_total: int
    cached_prompt_tokens_total: int

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def sequences_to_serve(self) -> int:
        """The sequences the engine steps, or will once it gets to them: running and waiting, less those waiting
        for their KV from a prefill worker (until it lands they are the prefill pool's load: counting them scales
        the decode pool for a backlog only more prefill replicas clear)."""
        return self.running + self.waiting - self.awaiting_kv

    @property
    def kv_wanted_fraction(self) -> float:
        """The KV pool its sequences want, as a share of it: the blocks in use and, for each sequence waiting for
        blocks (waiting, less those awaiting a prefill worker's KV: they hold theirs), as many as a sequence that
        holds blocks holds on average. Over 1 when they do not fit: the blocks in use stop at the pool's size
        however many sequences wait for it, so a pool that cannot admit its sequences would read as just full."""
        holding, blocked = self.running + self.awaiting_kv, self.waiting - self.awaiting_kv
        used = self.kv_blocks_used
        wanted = used + (blocked * used / holding if holding and blocked > 0 else 0)
        return wanted / max(self.kv_blocks_total, 1)


@dataclass(frozen=True)
class KVLayout:
    """How the engine's paged KV cache is laid out, read from the live tensors.

    ``block_shape`` is one block of one layer; on vLLM CPU it is
    ``(num_kv_heads, block_size, 2 * head_dim)`` with K then V in the last axis.
    """

    device: str
    dtype: str
    block_size: int
    num_blocks: int
    layer_names: list[str] = field(default_factory=list)
    block_shape: tuple[int, ...] = ()
    cache_layout: str = ""


@dataclass(frozen=True)
class PrefillJob:
    """What the router asks of a prefill worker: run the prompt, keep its KV under ``transfer_id``.

    ``block_hashes`` are the prompt's chained block digests (hex), so the decode
    side can check that the blocks it pulls belong to its prompt.
    """

    request: GenerateRequest
    transfer_id: str
    block_hashes: list[str]


@dataclass(frozen=True)
class PrefillResult:
    """A prefill's answer: the handle up front (``finished`` false) where the prompt starts at once, then the
    outcome (with the handle where none came up front)."""

    handle: str | None  # the transfer handle (hex); None: nothing is held, the decode worker prefills
    finished: bool = True
    cached_prompt_tokens: int | None = None  # when finished: the prompt tokens the prefill found in its cache


@dataclass(frozen=True)
class DecodeJob:
    """What the router asks of a decode worker: generate, pulling the KV behind ``handle`` if there is one."""

    request: GenerateRequest
    handle: str | None = None
    block_hashes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load, as placement and autoscaling weigh it: what its hosting reads from the engine and every
    heartbeat carries to the prefix index (one type on both sides, so a figure added here reaches the index)."""

    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    waiting_seqs: int = 0
    kv_used_fraction: float = 0.0
    kv_pool_tokens: int = 0  # the KV pool's size in tokens (0: not reported), so placed KV reads as a fraction
