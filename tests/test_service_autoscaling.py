"""The pools scale on their own load, in a real Serve app: long prompts grow the prefill pool, long
generations the decode pool, and both come back down with no request lost, streams included.

On the simulated engine: what scales is Serve, the policies, the router's drain and migration; the engine
only has to be slow in the right places, which its profile sets. (vLLM replicas scaled under load:
test_service_colocated.py.)"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from faults import SCALE_UP_S, Load, ramp_each_pool_and_back, wait_pools
from service_client import prompt, service_config, simulated_greedy

from pdserve.up import start
from pdserve_pb.v1 import generate_pb2 as pb

pytestmark = pytest.mark.service

SCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 4,
           "look_back_period_s": 2, "metrics_interval_s": 0.5}  # fmt: skip


# An 800-token prompt takes 1.6 s to compute; a decode step 10 ms, whatever the batch (a 3,500-token stream 35 s).
PROFILE = {"name": "autoscaling-test", "source": "tests: slow prompts, batched decodes", "base_ms": 10.0,
           "prefill_ms_per_token": 2.0, "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0,
           "decode_ms_per_context_token": 0.0, "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}  # fmt: skip


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    overrides = {
        "engine.kind": "simulated",
        "engine.simulated_profile": str(profile),
        "service.prefill.autoscaling": {**SCALING, "target_queued_prefill_tokens": 800},
        "service.decode.autoscaling": {**SCALING, "target_running_seqs": 6},
        "engine.max_model_len": 4096,  # streams long enough to outlast a scale-down
        "engine.num_kv_blocks": 1200,  # 14 streams of 900 tokens and 6 of 3500 on one replica, none preempted
        "router.recovery.drain_finish_s": 3,
    }
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def test_long_prompts_grow_the_prefill_pool_and_long_generations_the_decode_pool_and_both_come_back(client):
    grew, shrank = ramp_each_pool_and_back(client)
    print(f"\nautoscaling: prefill grew in {grew:.1f} s, both back to one replica {shrank:.1f} s after the load")


class Stream:
    """A greedy gRPC stream read in a thread: its tokens, then its last message or its error code."""

    def __init__(self, client, ids: list[int], max_tokens: int):
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.ids, self.max_tokens = ids, max_tokens
        self.call = client.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling),
                                         timeout=300)  # fmt: skip
        self.tokens: list[int] = []
        self.last = self.error = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.tokens.extend(reply.token_ids)
                self.last = reply
        except grpc.RpcError as exc:
            self.error = exc.code()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "a stream is stuck"


def drain_time(service, deployment: str, timeout_s: float) -> float:
    """Seconds from Serve starting to stop a replica of ``deployment`` until it is gone."""
    from ray import serve

    def stopping() -> int:
        states = serve.status().applications[service.config.service.app_name].deployments[deployment].replica_states
        return states.get("STOPPING", 0)

    deadline = time.monotonic() + timeout_s
    while not stopping():
        assert time.monotonic() < deadline, f"Serve stopped no {deployment} replica within {timeout_s} s"
        time.sleep(0.1)
    began = time.monotonic()
    while stopping():
        assert time.monotonic() < deadline, f"the {deployment} replica still stopping after {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - began


def test_a_decode_replica_removed_while_streaming_leaves_its_streams_intact(service, client, model_dir):
    """Fourteen clients streaming grow the decode pool to two; six long streams start (on the new,
    idle replica); the clients stop, so six streams run, one replica's worth. Serve removes a replica
    while they run: its streams finish there or move, every token as greedy decoding gives it, and
    the replica drains before Serve's graceful-shutdown deadline (the simulated engine's greedy tokens
    are a function of the prompt, so a moved stream's are checked whole)."""
    wait_pools(client, {"prefill": 1, "decode": 1}, 120)
    load = Load(lambda n: client.greedy(prompt(30, 7000 + n), 900)[2], clients=14).start()
    try:
        wait_pools(client, {"prefill": 1, "decode": 2}, SCALE_UP_S)
        long = [Stream(client, prompt(30, 8000 + n), 3500) for n in range(6)]
    finally:
        load.stop()
    drained = drain_time(service, "DecodeWorker", 90)
    wait_pools(client, {"prefill": 1, "decode": 1}, 10)
    for stream in long:
        stream.join(300)
    moved = [s for s in long if s.last is not None and s.last.timing.migrations]
    print(f"\ndrain: a decode replica drained in {drained:.1f} s; {len(moved)}/{len(long)} streams moved off it")
    assert drained < service.config.service.decode.graceful_shutdown_timeout_s  # left by itself, not force-killed
    assert load.errors == [] and [s.error for s in long] == [None] * len(long)
    assert all(s.last.finish_reason == "length" for s in long)
    assert all(s.tokens == simulated_greedy(model_dir, s.ids, 3500) for s in long)
    assert moved, "no stream was on the removed replica when it went"
    client.wait_idle(10)
