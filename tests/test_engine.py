"""The engine interface over vLLM's real engine, on tiny random-weight models."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
import threading
import time

import pytest
from helpers import collect, transformers_greedy, whitespace_banned

from engine.block_hash import hash_chain
from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineConfigError, EngineInputError
from engine.types import GenerateRequest, SamplingOptions, ToolUse

pytestmark = pytest.mark.engine

BLOCK = 32
GREEDY = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)


def engine_config(model_dir, **changes) -> EngineConfig:
    fields = dict(model=model_dir, dtype="float32", block_size=BLOCK, num_kv_blocks=48, max_model_len=512,
                  enforce_eager=True)  # fmt: skip
    return EngineConfig(**{**fields, **changes})


class EventLog:
    """Collects cache events from the engine's subscriber thread."""

    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def __call__(self, events):
        with self._lock:
            self.events.extend(events)

    def take(self, settle_s: float = 0.5):
        time.sleep(settle_s)  # events cross a ZMQ socket after the step that made them
        with self._lock:
            taken, self.events = self.events, []
        return taken


@pytest.fixture(scope="module")
def events():
    return EventLog()


@pytest.fixture(scope="module")
def events_port():
    from pdserve.local_redis import free_port

    return free_port()


@pytest.fixture(scope="module")
def engine(make_tiny_model, events, events_port):
    """The module's engine: tiny Llama, its cache events to ``events`` and published on ``events_port`` (TCP; the
    default endpoint, ipc, carries them in every service test)."""
    config = engine_config(make_tiny_model("llama"), kv_events_endpoint=f"tcp://*:{events_port}")
    engine = Engine(config, on_cache_events=events)
    yield engine
    engine.shutdown()


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def prompt(engine, n: int, offset: int = 0) -> list[int]:
    """``n`` distinct in-vocabulary token ids; different offsets give different prompts."""
    return [(offset * 7919 + i * 31) % (engine.vocab_size - 2) + 2 for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_output_equals_transformers(request, make_tiny_model, arch):
    model_dir = make_tiny_model(arch)
    own = arch != "llama"  # llama's is the module's engine
    engine = Engine(engine_config(model_dir)) if own else request.getfixturevalue("engine")
    try:
        prompts = [engine.encode("The quick brown fox jumps over the lazy dog."), prompt(engine, 70)]
        for i, ids in enumerate(prompts):
            got = tokens_of(collect(engine, GenerateRequest(f"{arch}-{i}", ids, GREEDY)))
            assert got == transformers_greedy(model_dir, ids, GREEDY.max_tokens)
            assert len(set(got)) > 3, "the tiny model should not collapse into one repeated token"
    finally:
        if own:
            engine.shutdown()


def test_streamed_deltas_join_to_the_full_text(engine):
    ids = engine.encode("Zürich, naïve café, 東京 and 🙂: ")
    deltas = collect(engine, GenerateRequest("multibyte", ids, SamplingOptions(max_tokens=40, temperature=0.0)))
    assert len(deltas) > 1
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == engine.decode(tokens_of(deltas))
    assert deltas[-1].completion_tokens == len(tokens_of(deltas))


def test_a_repetition_penalty_reaches_vllm_and_stops_a_greedy_loop(engine):
    ids = prompt(engine, 40, offset=3)

    def greedy(**penalty) -> list[int]:
        options = SamplingOptions(max_tokens=48, temperature=0.0, ignore_eos=True, **penalty)
        return tokens_of(collect(engine, GenerateRequest(f"penalty-{len(penalty)}", ids, options)))

    plain, penalized = greedy(), greedy(repetition_penalty=2.0)
    assert plain != penalized  # a random tiny model repeats itself greedily; the penalty changes that
    assert len(set(penalized)) > len(set(plain))


def test_multibyte_prompt_round_trips_through_the_tokenizer(engine):
    text = "Zürich, naïve café, 東京 and 🙂"
    assert engine.decode(engine.encode(text)) == text


def test_shared_prefix_is_served_from_cache_with_the_same_tokens(engine):
    prefix = prompt(engine, 6 * BLOCK, offset=1)
    cold = collect(engine, GenerateRequest("cold", prefix + prompt(engine, 10, offset=2), GREEDY))
    assert cold[0].cached_prompt_tokens == 0

    warm_ids = prefix + prompt(engine, 10, offset=3)
    warm = collect(engine, GenerateRequest("warm", warm_ids, GREEDY))
    assert warm[0].cached_prompt_tokens == 6 * BLOCK
    assert engine.stats().cached_prompt_tokens_total >= 6 * BLOCK

    asyncio.run(engine.reset_prefix_cache())
    again_cold = collect(engine, GenerateRequest("warm-again-cold", warm_ids, GREEDY))
    assert again_cold[0].cached_prompt_tokens == 0
    assert tokens_of(warm) == tokens_of(again_cold)


def test_cache_events_carry_the_pdserve_hashes_of_the_request(engine, events):
    asyncio.run(engine.reset_prefix_cache())
    events.take()
    ids = prompt(engine, 3 * BLOCK + 5, offset=4)
    deltas = collect(engine, GenerateRequest("hashed", ids, SamplingOptions(max_tokens=BLOCK, temperature=0.0)))
    stored = [e for e in events.take() if isinstance(e, BlocksStored)]
    # Prompt and generated tokens fill blocks; each full block is announced once, in chain order.
    all_tokens = ids + tokens_of(deltas)
    expected = hash_chain(engine.model_id, all_tokens[: len(all_tokens) - 1], BLOCK)
    assert [h for e in stored for h in e.hashes] == expected
    assert stored[0].parent is None
    for before, after in zip(stored, stored[1:], strict=False):
        assert after.parent == before.hashes[-1]


def test_a_reset_is_announced_as_cleared_before_the_next_blocks(engine, events):
    asyncio.run(engine.reset_prefix_cache())
    events.take()  # vLLM publishes events at the end of a step: an idle engine announces the reset with the next one
    collect(engine, GenerateRequest("after-reset", prompt(engine, 2 * BLOCK, offset=6), GREEDY))
    kinds = [type(e) for e in events.take()]
    assert AllCleared in kinds and BlocksStored in kinds
    assert kinds.index(AllCleared) < kinds.index(BlocksStored)


def test_removed_events_follow_eviction(engine, events):
    asyncio.run(engine.reset_prefix_cache())
    first = prompt(engine, 8 * BLOCK, offset=5)
    collect(engine, GenerateRequest("evict-me", first, SamplingOptions(max_tokens=1, temperature=0.0)))
    first_hashes = hash_chain(engine.model_id, first, BLOCK)
    events.take()
    # Fill the 47 usable blocks with other prompts so the first one's blocks are evicted.
    for i in range(6):
        collect(engine, GenerateRequest(f"filler-{i}", prompt(engine, 8 * BLOCK, offset=10 + i), GREEDY))
    removed = {h for e in events.take() if isinstance(e, BlocksRemoved) for h in e.hashes}
    assert set(first_hashes) <= removed
    again = collect(engine, GenerateRequest("evicted", first, SamplingOptions(max_tokens=1, temperature=0.0)))
    assert again[0].cached_prompt_tokens == 0


def test_abort_mid_stream_returns_the_kv_pool_to_baseline(engine):
    baseline = engine.stats().kv_blocks_used

    async def read_two_then_drop():
        request = GenerateRequest("dropped", prompt(engine, 4 * BLOCK, offset=20), GREEDY)
        stream = engine.generate(request)
        async for _ in stream:
            if engine.stats().kv_blocks_used > baseline:
                break
        used_while_running = engine.stats().kv_blocks_used
        await stream.aclose()
        return used_while_running

    assert asyncio.run(read_two_then_drop()) > baseline
    wait_until(lambda: engine.stats().kv_blocks_used == baseline and engine.stats().running == 0)


def test_abort_by_id_ends_the_stream_with_finish_reason_abort(engine):
    baseline = engine.stats().kv_blocks_used

    async def abort_after_first():
        request = GenerateRequest("aborted", prompt(engine, 2 * BLOCK, offset=21), SamplingOptions(max_tokens=200))
        deltas = []
        async for delta in engine.generate(request):
            deltas.append(delta)
            if len(deltas) == 1:
                engine.abort("aborted")
        return deltas

    deltas = asyncio.run(abort_after_first())
    assert deltas[-1].finish_reason == "abort"
    wait_until(lambda: engine.stats().kv_blocks_used == baseline)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


BAD_REQUESTS = [
    ("prompt_token_ids", dict(prompt_token_ids=[]), "must not be empty"),
    ("prompt_token_ids", dict(prompt_token_ids=[5, 10**6]), r"outside \[0, 1024\)"),
    ("prompt_token_ids", dict(prompt_token_ids=[5, -1]), "outside"),
    ("max_tokens", dict(prompt_token_ids=list(range(2, 500)), sampling=SamplingOptions(max_tokens=20)), "exceeds"),
    ("max_tokens", dict(sampling=SamplingOptions(max_tokens=0)), "at least 1"),
    ("temperature", dict(sampling=SamplingOptions(temperature=-1.0)), "non-negative"),
    ("top_p", dict(sampling=SamplingOptions(top_p=0.0)), "top_p"),
    ("top_k", dict(sampling=SamplingOptions(top_k=-2)), "top_k"),
    ("min_p", dict(sampling=SamplingOptions(min_p=1.5)), "min_p"),
]


@pytest.mark.parametrize(
    "field,changes,message", BAD_REQUESTS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_REQUESTS)]
)
def test_bad_request_raises_a_typed_error_and_the_engine_keeps_serving(engine, field, changes, message):
    baseline = engine.stats()
    request = GenerateRequest(**{"request_id": "bad", "prompt_token_ids": [5, 6, 7], **changes})
    with pytest.raises(EngineInputError, match=message) as info:
        collect(engine, request)
    assert info.value.field == field
    after = engine.stats()
    assert (after.running, after.waiting, after.kv_blocks_used) == (0, 0, baseline.kv_blocks_used)
    assert tokens_of(collect(engine, GenerateRequest("good", [5, 6, 7], GREEDY)))


def test_without_a_tool_call_parser_a_forced_call_is_read_as_json(engine, make_tiny_model):
    """No model format configured: ``required`` and a named call still work, by vLLM's JSON schema and reading."""
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
    }}}]  # fmt: skip
    ids = prompt(engine, 20, offset=9)
    for name, use in (("required", ToolUse(json.dumps(tools), "required")),
                      ("named", ToolUse(json.dumps(tools), "pick", named=True))):  # fmt: skip
        steer = tuple(whitespace_banned(make_tiny_model("llama")).items())
        options = SamplingOptions(max_tokens=60, temperature=0.0, tool_use=use, logit_bias=steer)
        deltas = collect(engine, GenerateRequest(f"json-{name}", ids, options))
        pieces = [piece for delta in deltas for piece in delta.tool_calls]
        assert pieces and pieces[0].name == "pick" and pieces[0].id
        assert 0 <= json.loads("".join(piece.arguments for piece in pieces if piece.index == 0))["n"] <= 9


def test_duplicate_request_id_is_refused_while_the_first_runs(engine):
    async def run_two():
        first = engine.generate(GenerateRequest("twin", [5, 6, 7], SamplingOptions(max_tokens=50)))
        await first.__anext__()
        with pytest.raises(EngineInputError, match="already running"):
            await engine.generate(GenerateRequest("twin", [5, 6, 7], GREEDY)).__anext__()
        await first.aclose()

    asyncio.run(run_two())


def test_kv_layout_describes_the_live_cache(engine):
    layout = engine.kv_layout()
    assert layout.device == "cpu" and layout.dtype == "float32"
    assert layout.block_size == BLOCK and layout.num_blocks == 48
    assert len(layout.layer_names) == 2
    # vLLM CPU: [num_kv_heads, block_size, 2 * head_dim] per block.
    assert layout.block_shape == (2, BLOCK, 2 * 32)


def test_model_directory_without_weights_is_refused(tmp_path, make_tiny_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    source = make_tiny_model("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text((source / name).read_text())
    with pytest.raises(EngineConfigError, match="model"):
        Engine(engine_config(broken))


def test_model_directory_with_corrupt_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "many"}))
    with pytest.raises(EngineConfigError, match="model"):
        Engine(engine_config(tmp_path))


def test_kv_events_reach_a_subscriber_in_another_process_on_a_configured_endpoint(engine, events, events_port):
    import msgspec
    import zmq
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    outside = zmq.Context.instance().socket(zmq.SUB)
    outside.setsockopt(zmq.SUBSCRIBE, b"")
    outside.connect(f"tcp://127.0.0.1:{events_port}")
    events.take()
    try:
        time.sleep(0.5)  # the outside subscription has no handshake: give it time to reach the publisher
        collect(engine, GenerateRequest("published", prompt(engine, 2 * BLOCK, offset=30), GREEDY))
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        seen = []
        while outside.poll(2000):
            seen += decoder.decode(outside.recv_multipart()[-1]).events
            if any(isinstance(e, BlockStored) for e in seen):
                break
        assert any(isinstance(e, BlockStored) for e in seen), "no stored event reached the outside subscriber"
        assert any(isinstance(e, BlocksStored) for e in events.take())  # and the engine's own subscriber gets them too
    finally:
        outside.close(linger=0)


def test_a_stopped_engine_leaves_no_socket_in_the_temp_directory(make_tiny_model):
    def sockets() -> set[str]:
        root = tempfile.gettempdir()
        return {name for name in os.listdir(root) if stat.S_ISSOCK(os.lstat(os.path.join(root, name)).st_mode)}

    before = sockets()
    engine = Engine(engine_config(make_tiny_model("llama")), on_cache_events=EventLog())
    collect(engine, GenerateRequest("one", prompt(engine, 3), GREEDY))
    engine.shutdown()
    assert sockets() - before == set()
