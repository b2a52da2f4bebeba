"""The whole service on the simulated engine: the same deployments, router, index, placement and KV hand-off,
no model.

The simulated engine's greedy output is a function of the prompt (engine/sim/tokens.py), so every reply is
checkable; its cache events go through the same index, and its KV through the same transfer path.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from service_client import LONG, prompt, service_config, simulated_greedy

from bench.engine_profile import REQUEST_REPEATS, REQUEST_WARM_UPS, prefix_hits_as_deployed
from engine.sim.profile import DEFAULT_PROFILE, PROFILES
from pdserve.up import start

pytestmark = pytest.mark.service

PREFILL, DECODE = 2, 3


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    # A loose load bound, as in test_service.py: the default (1.3x the fair share of recent placements) spreads
    # one prefix sent again and again over the replicas on purpose.
    overrides = {
        "engine.kind": "simulated", "engine.num_kv_blocks": 256, "service.prefill.num_replicas": PREFILL,
        "service.decode.num_replicas": DECODE, "router.placement.load_bound": 3.0,
    }  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def held(client, worker_id: str) -> int:
    """The blocks the index records for the worker."""
    return next((w.cached_blocks for w in client.status().workers if w.worker_id == worker_id), 0)


def settled(client, worker_id: str) -> bool:
    """The worker's last heartbeat reads no prompt queued."""
    return all(w.queued_prefill_tokens == 0 for w in client.status().workers if w.worker_id == worker_id)


def test_every_replica_reports_in_and_a_long_prompt_is_prefilled_apart_and_its_kv_pulled(client, model_dir):
    def all_in() -> bool:
        roles = [w.role for w in client.status().workers]
        return roles.count("prefill") == PREFILL and roles.count("decode") == DECODE

    wait_for(all_in, 30, "not every replica reported")
    ids = prompt(200, 3)
    tokens, _, last = client.greedy(ids, 12)
    assert tokens == simulated_greedy(model_dir, ids, 12)
    assert last.timing.placement == "disaggregated" and last.usage.kv_transferred_tokens == 199
    assert client.metric("pdserve:kv_transfer_bytes_total") > 0
    assert client.metric("pdserve:kv_transfer_failures_total") == 0
    client.wait_idle(10)  # the prefill worker's blocks came back once pulled


def test_no_worker_replica_has_torch_or_vllm_loaded_after_serving(service, client):
    """Thirty-two simulated workers fit on one machine because each is a small process: after the requests
    above (a KV pull included), none has loaded torch or vLLM."""
    import ray
    from faults import replica_actor

    def heavy_modules(_replica) -> list[str]:
        import sys

        return sorted(name for name in ("torch", "vllm", "transformers") if name in sys.modules)

    client.greedy(prompt(200, 5), 2)  # one more disaggregated request, so both roles have pulled or offered KV
    workers = [w for w in client.status().workers if w.role in ("prefill", "decode")]
    assert len(workers) == PREFILL + DECODE
    for worker in workers:
        deployment = "PrefillWorker" if worker.role == "prefill" else "DecodeWorker"
        actor = replica_actor(service, deployment, worker.worker_id)
        assert ray.get(actor.__ray_call__.remote(heavy_modules), timeout=30) == [], worker.worker_id


def test_http_gives_the_same_greedy_tokens(client, model_dir):
    ids = prompt(120, 4)
    status, reply = client.post("/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                    "ignore_eos": True})  # fmt: skip
    assert status == 200, reply
    assert reply["pdserve"]["token_ids"] == simulated_greedy(model_dir, ids, 6)


def test_a_long_prompt_sent_again_is_prefilled_where_it_is_cached(client):
    ids = prompt(300, 11)
    before = {w.worker_id: w.cached_blocks for w in client.status().workers}
    _, _, first = client.greedy(ids, 4)
    holder = first.timing.prefill_worker
    # The holder may hold earlier requests' blocks: wait for this prompt's 9 full blocks (of 32) on top of them.
    wait_for(lambda: held(client, holder) >= before[holder] + 9, 10, "the holder's blocks never reached the index")
    # The decode worker that pulled the prompt caches it too, so a short suffix would be prefilled there (fewer
    # than local_prefill_max_uncached_tokens uncached); a long one is sent to a prefill worker, and the holder is
    # the cheapest.
    for suffix in range(3):
        # Placement reads each worker's queue from its last heartbeat: wait until the holder's reads settled (a
        # worker beats as soon as a prompt is done; a beat taken while it ran would count it, test_hosting.py).
        wait_for(lambda: settled(client, holder), 5, "the holder's queue never read empty")
        _, _, again = client.greedy(ids + prompt(280, 20 + suffix), 4)
        assert again.timing.placement == "disaggregated"
        assert again.timing.prefill_worker == holder and again.usage.cached_prompt_tokens >= 288


def test_the_time_to_the_first_token_is_reported_in_parts_that_add_up_to_it(client):
    names = ("placement", "prefill_handle", "worker", "transit")
    for ids, placement in ((prompt(300, 41), "disaggregated"), (prompt(3, 42), "local_prefill")):
        _, _, last = client.greedy(ids, 2)
        assert last.timing.placement == placement
        assert set(last.timing.ttft_parts_s) == set(names)
        assert sum(last.timing.ttft_parts_s.values()) == pytest.approx(last.timing.ttft_s, rel=1e-6)
        assert last.timing.ttft_parts_s["worker"] > 0
    status, reply = client.post("/v1/completions", {"prompt": prompt(4, 43), "max_tokens": 2})
    assert status == 200 and set(reply["pdserve"]["timing"]["ttft_parts"]) == set(names)  # HTTP gives them too
    metrics = client.get("/metrics")[1].decode()

    def figure(name: str, part: str | None = None) -> float:
        label = "" if part is None else f'{{part="{part}"}}'
        [value] = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + label + " ")]
        return value

    ttft, parts = "pdserve:time_to_first_token_seconds", "pdserve:time_to_first_token_part_seconds"
    for part in names:  # every request's first token came on its decode worker's first delta: each part measured
        assert figure(parts + "_count", part) == figure(ttft + "_count") >= 2
    assert sum(figure(parts + "_sum", part) for part in names) == pytest.approx(figure(ttft + "_sum"), rel=1e-6)
    assert figure(parts + "_sum", "worker") > 0 and figure(parts + "_sum", "prefill_handle") > 0


def test_prefix_hits_one_at_a_time_are_computed_where_their_prefix_is_and_timed_there(service, model_dir):
    """What the simulator's check measures a request's time in a worker from (bench/engine_profile.py): every
    hit kept was computed on the decode worker holding its prefix (most are: the load bound may spill one), in no
    less than the profile's step for it."""
    shape = (LONG // 2, 512)  # uncached tokens few enough to be computed on the decode worker
    hits = prefix_hits_as_deployed(service.http_url, service.grpc_address, vocab(model_dir), shape, output_tokens=4)
    worker_ms = asyncio.run(hits)
    assert REQUEST_REPEATS // 2 <= len(worker_ms) <= REQUEST_REPEATS
    fresh, cached = shape
    assert min(worker_ms) >= 1000 * PROFILES[DEFAULT_PROFILE].step_s(fresh, 0, 0, fresh * cached)


def test_prefix_hits_ask_for_the_output_length_of_the_requests_they_stand_for(service, client, model_dir):
    """A hit that goes on decoding has its first token later than one that stops there (bench/engine_profile.py):
    each of them, the one that puts the prefix on a worker and the warm-ups among them, generates the tokens given."""

    def generated() -> float:
        metrics = client.get("/metrics")[1].decode()
        [value] = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("pdserve:generation_tokens_total ")]  # fmt: skip
        return value

    before = generated()
    hits = prefix_hits_as_deployed(service.http_url, service.grpc_address, vocab(model_dir), (LONG // 2, 512), 7)
    asyncio.run(hits)
    assert generated() - before == (1 + REQUEST_WARM_UPS + REQUEST_REPEATS) * 7


def test_prefix_hits_prefilled_apart_give_no_request_time_rather_than_a_wrong_one(service, model_dir):
    shape = (LONG * 2, 512)  # too many uncached tokens to be computed on the decode worker
    hits = prefix_hits_as_deployed(service.http_url, service.grpc_address, vocab(model_dir), shape, output_tokens=4)
    with pytest.raises(RuntimeError, match="were not computed on the decode worker"):
        asyncio.run(hits)


def vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_a_router_replica_restarted_rebuilds_its_in_memory_index_from_the_workers(service, client):
    """The in-memory index lives in the router replica: its replacement starts empty, every worker's next
    heartbeat finds itself unknown and re-sends what it holds, and a cached prompt is placed on its holder again."""
    import grpc
    import ray

    ids = prompt(300, 31)
    before = {w.worker_id: w.cached_blocks for w in client.status().workers}
    _, _, first = client.greedy(ids, 4)
    holder, router = first.timing.prefill_worker, first.timing.router
    wait_for(lambda: held(client, holder) >= before[holder] + 9, 10, "the holder's blocks never reached the index")
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{service.config.service.app_name}#Router#{router}", namespace="serve"))

    def replaced() -> bool:  # Serve starts a new router replica in the killed one's place
        try:
            return client.greedy(prompt(8, 33), 1)[2].timing.router != router
        except grpc.RpcError:  # not up yet
            return False

    def rebuilt() -> bool:
        workers = {w.worker_id: w.cached_blocks for w in client.status().workers}
        return len(workers) == PREFILL + DECODE and workers.get(holder, 0) >= before[holder] + 9

    wait_for(replaced, 120, "no router replica took the killed one's place")
    wait_for(rebuilt, 30, "the replacement router's index never held the holder's blocks again")
    wait_for(lambda: settled(client, holder), 5, "the holder's queue never read empty")
    _, _, again = client.greedy(ids + prompt(280, 32), 4)
    assert again.timing.router != router and again.timing.placement == "disaggregated"
    assert again.timing.prefill_worker == holder and again.usage.cached_prompt_tokens >= 288
