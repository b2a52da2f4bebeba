"""The simulated engine keeps vLLM's scheduling and KV-cache semantics; only the model is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from engine.block_hash import hash_chain
from engine.cache_events import BlocksRemoved, BlocksStored
from engine.config import EngineConfig, KVConnectorSpec
from engine.errors import EngineDeadError, EngineInputError
from engine.sim.engine import SimulatedEngine
from engine.sim.kv_pool import KVPool
from engine.sim.profile import PROFILES, HardwareProfile, load_profile
from engine.sim.scheduler import Scheduler, SimSequence
from engine.types import GenerateRequest, SamplingOptions
from kv_transfer.handoff import PULLED_TOKENS_KEY, TOKEN_ENV, SenderInfo, transfer_handle

BLOCK = 16


def quick_profile(tmp_path, **figures) -> str:
    """A profile whose steps take about a millisecond, as a JSON file."""
    fields = {"name": "quick", "source": "tests", "base_ms": 1.0, "prefill_ms_per_token": 0.0,
              "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0, "decode_ms_per_context_token": 0.0,
              "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9, **figures}  # fmt: skip
    path = tmp_path / f"profile-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(fields))
    return str(path)


@pytest.fixture
def make_engine(make_tiny_model, tmp_path):
    made = []

    def make(events=None, **fields):
        fields = {"num_kv_blocks": 64, "simulated_profile": quick_profile(tmp_path), **fields}
        config = EngineConfig(kind="simulated", model=make_tiny_model("llama"), block_size=BLOCK, **fields)
        engine = SimulatedEngine(config, on_cache_events=None if events is None else events.extend)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def run(engine, ids, params=None, **sampling):
    async def collect():
        options = SamplingOptions(**{"max_tokens": 8, "temperature": 0.0, **sampling})
        return [d async for d in engine.generate(GenerateRequest(uuid.uuid4().hex, ids, options, params))]

    return asyncio.run(collect())


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(offset * 7919 + i * 31) % 1000 + 2 for i in range(n)]


def sequence(rid: str, n: int, max_tokens: int = 4, offset: int = 0) -> SimSequence:
    return SimSequence(rid, prompt(n, offset), max_tokens, sample=lambda: 7)


def run_to_end(scheduler: Scheduler) -> list[tuple[str, ...]]:
    """Steps until every sequence has its tokens; each step's scheduled request ids."""
    steps = []
    while (step := scheduler.schedule()) is not None:
        steps.append(tuple(step.scheduled))
        for seq in scheduler.complete(step):
            if len(seq.output) >= seq.max_tokens:
                scheduler.finish(seq, "length")
    return steps


def test_a_prompt_seen_before_is_served_from_the_prefix_cache_under_pdserves_block_hashes(make_engine):
    events = []
    engine = make_engine(events)
    ids = prompt(100)
    first = run(engine, ids)
    again = run(engine, ids)
    stored = [digest for event in events if isinstance(event, BlocksStored) for digest in event.hashes]
    assert stored[:6] == hash_chain(engine.model_id, ids, BLOCK)  # the prompt's six full blocks, in chain order
    assert first[-1].cached_prompt_tokens == 0
    assert again[-1].cached_prompt_tokens == 96
    assert engine.stats().cached_prompt_tokens_total == 96


def test_greedy_output_is_a_function_of_the_prompt_and_a_seed_picks_a_sampled_one(make_engine):
    engine = make_engine()
    greedy = [t for d in run(engine, prompt(20)) for t in d.token_ids]
    assert greedy == [t for d in run(engine, prompt(20)) for t in d.token_ids]
    assert greedy != [t for d in run(engine, prompt(20, 1)) for t in d.token_ids]
    seeded = [t for d in run(engine, prompt(20), temperature=1.0, seed=3) for t in d.token_ids]
    assert seeded == [t for d in run(engine, prompt(20), temperature=1.0, seed=3) for t in d.token_ids]
    assert seeded != [t for d in run(engine, prompt(20), temperature=1.0, seed=4) for t in d.token_ids]
    assert seeded != greedy


def test_prompts_of_1_to_4_tokens_are_answered(make_engine):
    engine = make_engine()
    for n in range(1, 5):
        deltas = run(engine, prompt(n), max_tokens=3, ignore_eos=True)
        assert deltas[-1].completion_tokens == 3 and deltas[-1].finish_reason == "length", n


def test_greedy_output_resumed_from_the_prompt_and_its_first_tokens_goes_on_with_the_same_tokens(make_engine):
    """As a real model's: a stream moved to another worker carries on unchanged."""
    engine = make_engine()
    whole = [t for d in run(engine, prompt(20), max_tokens=12, ignore_eos=True) for t in d.token_ids]
    resumed = [t for d in run(engine, prompt(20) + whole[:5], max_tokens=7, ignore_eos=True) for t in d.token_ids]
    assert resumed == whole[5:]


def test_max_tokens_and_a_stop_token_end_the_stream(make_engine):
    engine = make_engine()
    deltas = run(engine, prompt(20), max_tokens=5, ignore_eos=True)
    assert [d.completion_tokens for d in deltas] == [1, 2, 3, 4, 5] and deltas[-1].finish_reason == "length"
    third = deltas[2].token_ids[0]
    stopped = run(engine, prompt(20), max_tokens=5, stop_token_ids=(third,))
    assert stopped[-1].finish_reason == "stop" and stopped[-1].completion_tokens == 3


@pytest.mark.parametrize("option", [{"stop": ("x",)}, {"logprobs": 2}, {"presence_penalty": 0.5}])
def test_an_option_it_does_not_model_is_refused_by_name(make_engine, option):
    engine = make_engine()
    with pytest.raises(EngineInputError) as refused:
        run(engine, prompt(8), **option)
    assert refused.value.field == next(iter(option))
    assert engine.stats().running == 0


def test_a_step_takes_the_time_its_profile_gives(make_engine, tmp_path):
    profile = quick_profile(tmp_path, base_ms=20.0, prefill_ms_per_token=1.0)
    engine = make_engine(simulated_profile=profile)
    start = time.monotonic()
    run(engine, prompt(100), max_tokens=5, ignore_eos=True)
    elapsed = time.monotonic() - start
    expected = (20 + 100) / 1000 + 4 * 20 / 1000  # one prefill step of 100 tokens, then four decode steps
    assert expected <= elapsed < expected + 0.5


def test_a_request_spends_its_request_time_before_its_first_step_not_between_tokens(make_engine, tmp_path):
    engine = make_engine(simulated_profile=quick_profile(tmp_path, base_ms=10.0, request_ms=300.0))

    async def token_times() -> list[float]:
        options = SamplingOptions(max_tokens=5, temperature=0.0, ignore_eos=True)
        start = time.monotonic()
        return [time.monotonic() - start async for _ in engine.generate(GenerateRequest("r", prompt(8), options))]

    times = asyncio.run(token_times())
    assert 0.3 + 0.01 <= times[0] < 0.3 + 0.25
    assert times[-1] - times[0] < 4 * 0.01 + 0.25  # four decode steps of 10 ms


def test_a_request_closed_during_its_request_time_is_never_scheduled(make_engine, tmp_path):
    engine = make_engine(simulated_profile=quick_profile(tmp_path, request_ms=300.0))

    async def closed_early() -> None:
        stream = engine.generate(GenerateRequest("r", prompt(8), SamplingOptions(max_tokens=4)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.1)

    asyncio.run(closed_early())
    time.sleep(0.4)
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.prompt_tokens_total) == (0, 0, 0)


def step_processes() -> list[psutil.Process]:
    """This process's live children running a step loop (a child an earlier test left unreaped is skipped)."""
    found = []
    for child in psutil.Process().children():
        try:
            if "engine.sim.compute" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


@contextlib.contextmanager
def busy_process_on(core: int):
    """A process that spins on ``core`` at this process's niceness, as the serving processes do beside an engine."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {core})
        yield
    finally:
        busy.kill()
        busy.wait(timeout=10)


def test_on_cores_a_step_is_cpu_time_of_a_process_bound_to_the_engines_cores(make_engine, tmp_path):
    core = max(os.sched_getaffinity(0))
    engine = make_engine(simulated_profile=quick_profile(tmp_path, base_ms=50.0), simulated_compute="cores",
                         cpu_cores=str(core))  # fmt: skip
    [process] = step_processes()
    assert process.cpu_affinity() == [core]
    run(engine, prompt(4), max_tokens=5, ignore_eos=True)  # five steps of 50 ms
    assert process.cpu_times().user + process.cpu_times().system >= 0.9 * 5 * 0.050
    engine.shutdown()
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_on_cores_the_step_process_spins_for_a_second_after_a_step_then_sleeps(make_engine, tmp_path):
    """As a vLLM rank waits for its next step: whatever shares its core pays for the wait too."""
    engine = make_engine(simulated_compute="cores", cpu_cores=str(max(os.sched_getaffinity(0))))
    [process] = step_processes()
    run(engine, prompt(4), max_tokens=1)

    def cpu_seconds_over(seconds: float) -> float:
        before = sum(process.cpu_times()[:2])
        time.sleep(seconds)
        return sum(process.cpu_times()[:2]) - before

    assert cpu_seconds_over(0.4) > 0.1  # ~0.4 alone on its core; half of that beside one busy process
    time.sleep(1.0)
    assert cpu_seconds_over(0.4) < 0.05


def test_a_step_on_cores_stretches_beside_a_busy_process_and_an_asleep_one_does_not(make_engine, tmp_path):
    """Two processes spinning on one core at one niceness each get half of it: a step of CPU time takes twice its
    time, as a vLLM-CPU step does beside busy serving processes; a sleeping step takes its time whatever runs."""
    core = max(os.sched_getaffinity(0))
    profile = quick_profile(tmp_path, base_ms=40.0)
    asleep = make_engine(simulated_profile=profile)
    on_cores = make_engine(simulated_profile=profile, simulated_compute="cores", cpu_cores=str(core))
    [step_process] = step_processes()
    step_process.nice(os.getpriority(os.PRIO_PROCESS, 0))  # beside the busy process at one niceness, wherever run

    def seconds(engine) -> float:
        start = time.monotonic()
        run(engine, prompt(4), max_tokens=6, ignore_eos=True)  # six steps of 40 ms: 0.24 s alone
        return time.monotonic() - start

    alone = seconds(on_cores)
    with busy_process_on(core):
        stretched, slept = seconds(on_cores), seconds(asleep)
    assert alone < 0.24 * 1.3
    assert stretched > 1.6 * alone
    assert slept < 0.24 * 1.3


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_on_cores_a_prompt_of_one_to_four_tokens_is_served(make_engine, length):
    engine = make_engine(simulated_compute="cores")
    deltas = run(engine, prompt(length), max_tokens=3, ignore_eos=True)
    assert sum(len(delta.token_ids) for delta in deltas) == 3 and deltas[-1].finish_reason == "length"


def test_an_engine_whose_step_process_died_is_dead_and_says_so(make_engine, tmp_path):
    engine = make_engine(simulated_compute="cores")
    [process] = step_processes()
    process.kill()
    process.wait(timeout=10)
    with pytest.raises(EngineDeadError, match="step"):
        run(engine, prompt(4), max_tokens=2)
    with pytest.raises(EngineDeadError):
        engine.check_alive()


def test_the_step_budget_splits_a_long_prompt_into_chunks_beside_running_decodes():
    scheduler = Scheduler(KVPool(64), "m", BLOCK, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add(sequence("short", 10, max_tokens=6))
    scheduler.add(sequence("long", 150, max_tokens=1))
    steps = run_to_end(scheduler)
    assert steps[0] == ("short", "long")  # 10 prompt tokens and the first 54 of the long one
    assert steps[1] == ("short", "long") and steps[2] == ("short", "long")  # one decode token + 63 prompt tokens
    assert sum(1 for step in steps if "long" in step) == 3


def test_prompt_tokens_pay_for_the_context_cached_before_them_a_prefix_hit_or_an_earlier_chunk():
    scheduler = Scheduler(KVPool(64), "m", BLOCK, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add(sequence("first", 100, max_tokens=1))
    steps = []
    while (step := scheduler.schedule()) is not None:
        steps.append(step)
        for seq in scheduler.complete(step):
            scheduler.finish(seq, "length")
    assert [s.prefill_context_pairs for s in steps] == [0, 36 * 64]  # chunk two attends to chunk one's 64
    scheduler.add(SimSequence("again", prompt(100) + [5] * 20, 1, sample=lambda: 7))
    step = scheduler.schedule()
    assert step.prefill_tokens == 120 - 96 and step.prefill_context_pairs == 24 * 96  # six blocks were a hit
    profile = HardwareProfile("p", "", 0, 0, 0, 0, 0, 1, 1, prefill_ms_per_context_pair=0.5)
    assert profile.step_s(24, 0, 0, 24 * 96) == pytest.approx(0.5 * 24 * 96 / 1000)


def test_only_a_step_that_computes_prompt_tokens_pays_the_prefill_steps_constant():
    profile = HardwareProfile("p", "", 9.0, 0, 0, 0, 0, 1, 1, prefill_step_ms=11.0)
    assert profile.step_s(0, 4, 100) == pytest.approx(0.009)
    assert profile.step_s(1, 4, 100) == pytest.approx(0.020)  # a pulled prompt's last token is a prompt token


def test_a_full_pool_preempts_the_latest_sequence_and_every_request_still_finishes():
    pool = KVPool(6)
    scheduler = Scheduler(pool, "m", BLOCK, max_num_seqs=8, max_num_batched_tokens=512)
    first, second = sequence("first", 40, max_tokens=40), sequence("second", 40, max_tokens=40, offset=1)
    scheduler.add(first)
    scheduler.add(second)
    run_to_end(scheduler)
    assert second.preemptions >= 1 and first.preemptions == 0
    assert len(first.output) == len(second.output) == 40
    assert pool.free_blocks == 6


def test_sequences_the_kv_pool_cannot_admit_count_in_the_kv_it_is_wanted_for_beyond_the_pool(make_engine, tmp_path):
    """The decode pool's autoscaling reads ``kv_wanted_fraction`` (pdserve/autoscaling.py): the blocks in use stop
    at the pool's size, the sequences waiting for blocks do not."""
    engine = make_engine(num_kv_blocks=12, simulated_profile=quick_profile(tmp_path, base_ms=50.0))

    async def three_that_fit_two_at_a_time():
        options = SamplingOptions(max_tokens=10, ignore_eos=True)

        async def collect(offset: int):
            return [d async for d in engine.generate(GenerateRequest(uuid.uuid4().hex, prompt(70, offset), options))]

        streams = [asyncio.ensure_future(collect(offset)) for offset in range(3)]
        async with asyncio.timeout(5):
            while (engine.stats().running, engine.stats().waiting) != (2, 1):
                await asyncio.sleep(0.005)
        full = engine.stats()
        await asyncio.wait_for(asyncio.gather(*streams), 10)
        return full

    full = asyncio.run(three_that_fit_two_at_a_time())
    assert full.kv_blocks_used == 10  # two 70-token prompts, five blocks each: a third does not fit in the two left
    assert full.kv_wanted_fraction == pytest.approx(15 / 12)  # and wants five more
    assert engine.stats().kv_wanted_fraction == 0.0


def test_the_least_recently_freed_prefix_is_evicted_first_and_announced_removed():
    pool = KVPool(4)
    old, recent = pool.allocate([], 2), pool.allocate([], 2)
    for block, digest in zip(old + recent, [b"a", b"b", b"c", b"d"], strict=True):
        pool.cache(block, digest, None)
    pool.free(old)
    pool.free(recent)
    pool.take_events()
    pool.allocate([], 1)
    assert pool.take_events() == [BlocksRemoved([b"b"])]  # old's tail block: freed first, tail first
    assert pool.cached_prefix([b"a"]) == [old[0]] and pool.cached_prefix([b"b"]) == []


def test_a_named_profile_cites_its_figures_and_a_bad_one_is_refused(tmp_path):
    assert load_profile("llama-3.1-8b-h100") is PROFILES["llama-3.1-8b-h100"]
    assert "NIM" in PROFILES["llama-3.1-8b-h100"].source
    with pytest.raises(ValueError, match="no hardware profile"):
        load_profile("a100-nonesuch")
    with pytest.raises(ValueError, match="base_ms"):
        HardwareProfile("bad", "", -1, 0, 0, 0, 0, 1, 1)
    assert load_profile(quick_profile(tmp_path)).prefill_ms_per_context_pair == 0.0  # a file from before the term


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "simulated"}, "num_kv_blocks"),
        ({"kind": "simulated", "num_kv_blocks": 8, "tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"simulated_profile": "llama-3.1-8b-h100"}, "only for kind: simulated"),
        ({"simulated_compute": "cores"}, "only for kind: simulated"),
        ({"kind": "simulated", "num_kv_blocks": 8, "cpu_cores": "0"}, "cpu_cores .*only with simulated_compute: cores"),
        ({"kind": "simulated", "num_kv_blocks": 8, "nice": 5}, "nice .*only with simulated_compute: cores"),
        *[
            ({"kind": "simulated", "num_kv_blocks": 8, name: value}, f" {name} is a vLLM setting")
            for name, value in [
                ("dtype", "bfloat16"),
                ("kv_cache_gib", 2),
                ("enable_prefix_caching", False),
                ("enforce_eager", True),
                ("gpu_memory_utilization", 0.5),
                ("kv_cache_dtype", "fp8"),
                ("seed", 7),
                ("kv_events_endpoint", "tcp://*:5557"),
                ("log_level", "INFO"),
            ]
        ],  # fmt: skip
    ],
)
def test_a_simulated_engine_config_it_cannot_honour_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**fields)


def connector(role: str) -> KVConnectorSpec:
    return KVConnectorSpec(module_path="kv_transfer.sim_connector", class_name="SimulatedKV", role=role)


def producer_and_consumer(make_engine, ids: list[int], transfer_id: str):
    """A prefill engine and a decode engine, the prompt's block hashes and the handle of its transfer."""
    producer = make_engine(kv_connector=connector("kv_producer"))
    consumer = make_engine(kv_connector=connector("kv_consumer"))
    hashes = [digest.hex() for digest in hash_chain(producer.model_id, ids, BLOCK)]
    senders = [SenderInfo.from_dict(rank) for rank in producer.kv_connector_handshake()]
    return producer, consumer, hashes, transfer_handle(senders, BLOCK, transfer_id, hashes, len(ids))


def test_a_prompt_prefilled_on_one_simulated_engine_is_pulled_over_the_wire_by_another(make_engine, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "sim-secret")
    ids = prompt(100)
    producer, consumer, hashes, handle = producer_and_consumer(make_engine, ids, "t-1")
    produce = {"pdserve": "produce", "transfer_id": "t-1", "block_hashes": hashes}
    prefill = run(producer, ids, produce, max_tokens=1)
    assert prefill[-1].kv_transfer_params == {"pdserve_handle": handle}
    assert producer.open_kv_transfers() == 1 and producer.stats().kv_blocks_free == 64 - 7  # held for the puller
    decode = run(consumer, ids, {"pdserve": "consume", "handle": handle, "block_hashes": hashes})
    assert [t for d in decode for t in d.token_ids] == [t for d in run(make_engine(), ids) for t in d.token_ids]
    assert decode[-1].kv_transfer_params == {PULLED_TOKENS_KEY: 99}  # the last prompt token is computed here
    assert consumer.kv_transfer_stats()["pulls"]["grpc"]["bytes"] == 7 * BLOCK  # a byte per token of 7 blocks
    assert producer.open_kv_transfers() == 0 and producer.stats().kv_blocks_free == 64  # released once pulled


def test_a_decode_admitted_before_its_prefill_counts_as_awaiting_its_kv_until_the_kv_lands(make_engine, monkeypatch):
    """The decode worker gets its job with the handle up front: until the prefill worker's KV lands, the request
    waits on the prefill pool (``stats().awaiting_kv``), and ``sequences_to_serve`` (the decode pool's scaling
    figure) leaves it out."""
    monkeypatch.setenv(TOKEN_ENV, "sim-secret")
    ids = prompt(100)
    producer, consumer, hashes, handle = producer_and_consumer(make_engine, ids, "t-3")

    async def collect(engine, params, max_tokens):
        request = GenerateRequest(uuid.uuid4().hex, ids, SamplingOptions(max_tokens=max_tokens), params)
        return [d async for d in engine.generate(request)]

    async def decode_then_prefill():
        consume = {"pdserve": "consume", "handle": handle, "block_hashes": hashes}
        decoding = asyncio.ensure_future(collect(consumer, consume, 4))
        async with asyncio.timeout(10):
            while consumer.stats().awaiting_kv == 0:
                await asyncio.sleep(0.01)
        awaiting = consumer.stats()
        await collect(producer, {"pdserve": "produce", "transfer_id": "t-3", "block_hashes": hashes}, 1)
        return awaiting, await asyncio.wait_for(decoding, 10)

    awaiting, decode = asyncio.run(decode_then_prefill())
    assert (awaiting.awaiting_kv, awaiting.waiting, awaiting.running) == (1, 1, 0)
    assert awaiting.sequences_to_serve == 0
    assert awaiting.kv_blocks_used == 7  # its blocks are held from admission
    assert decode[-1].kv_transfer_params == {PULLED_TOKENS_KEY: 99}  # it waited for the pull, computed nothing
    assert consumer.stats().awaiting_kv == 0


def test_an_offer_nobody_pulls_is_freed_when_its_transfer_is_aborted(make_engine, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "sim-secret")
    producer = make_engine(kv_connector=connector("kv_producer"))
    ids = prompt(64)
    hashes = [digest.hex() for digest in hash_chain(producer.model_id, ids, BLOCK)]
    run(producer, ids, {"pdserve": "produce", "transfer_id": "t-2", "block_hashes": hashes}, max_tokens=1)
    assert producer.stats().kv_blocks_free == 60
    asyncio.run(producer.abort_kv_transfer("t-2"))
    assert producer.open_kv_transfers() == 0 and producer.stats().kv_blocks_free == 64
    assert producer.kv_transfer_stats()["offers"] == {"aborted": 1}


def test_a_prefill_preempted_after_its_offer_withdraws_it_and_holds_nothing(make_engine, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "sim-secret")
    producer = make_engine(kv_connector=connector("kv_producer"), num_kv_blocks=12, max_num_batched_tokens=32)
    prompts = [prompt(150, offset) for offset in (1, 2)]  # 10 blocks each, a chunk of 32 tokens a step: no room

    async def prefill(number: int, ids: list[int]):
        hashes = [digest.hex() for digest in hash_chain(producer.model_id, ids, BLOCK)]
        params = {"pdserve": "produce", "transfer_id": f"t-{number}", "block_hashes": hashes}
        request = GenerateRequest(f"r-{number}", ids, SamplingOptions(max_tokens=1), params)
        return [d async for d in producer.generate(request)][-1].kv_transfer_params

    async def first_pulled_then_second():
        second = asyncio.ensure_future(prefill(1, prompts[1]))
        first = await prefill(0, prompts[0])  # it holds 10 blocks: the second, offered, is preempted for room
        await producer.abort_kv_transfer("t-0")  # its puller is done with them: room again
        return first, await second

    first, second = asyncio.run(first_pulled_then_second())
    assert first is not None and second is None  # preempted after its offer: withdrawn, nothing held for it
    assert producer.kv_transfer_stats()["offers"] == {"aborted": 2}
    assert producer.open_kv_transfers() == 0 and producer.stats().kv_blocks_free == 12


def test_a_simulated_worker_never_imports_torch_or_vllm():
    """What a simulated worker's process loads: the worker deployments, the engine and its connector. vLLM would
    add ~8 s and ~350 MiB to each of them, torch ~2 s and ~200 MiB (the KV channels move numpy arrays for it)."""
    code = (
        "import sys, prefill_worker.deployment, decode_worker.deployment, engine.sim.engine, "
        "kv_transfer.sim_connector; print(sorted(m for m in ('vllm', 'transformers', 'torch') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"
