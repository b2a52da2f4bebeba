"""Fault injection into a running pdserve: real processes, real signals, real Redis.

Each helper acts on what the service really runs: a Serve replica is a Ray
actor process (its engine in-process), killed with SIGKILL as the kernel's OOM
killer or a crashed host would; Redis is a ``redis-server`` process. Nothing
is patched inside the service.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray


def replica_actor(service, deployment: str, replica_id: str):
    """The Ray actor of one Serve replica, by the replica id it reports to the index under."""
    name = f"SERVE_REPLICA::{service.config.service.app_name}#{deployment}#{replica_id}"
    return ray.get_actor(name, namespace="serve")


def replica_pid(service, deployment: str, replica_id: str) -> int:
    actor = replica_actor(service, deployment, replica_id)
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def kill_replica(service, deployment: str, replica_id: str) -> float:
    """SIGKILL the replica's process; returns when (``time.monotonic()``) it was killed."""
    pid = replica_pid(service, deployment, replica_id)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def engine_workers(service, deployment: str, replica_id: str, timeout_s: float = 30.0) -> list[int]:
    """The replica's vLLM rank worker processes (one per tensor-parallel rank), by where they sit: the replica
    starts vLLM's engine core, the engine core starts the rank workers (multiprocessing's resource trackers
    beside them left out). Not by title: vLLM's setproctitle did not always take in CI.

    Fails naming every process under the replica when none shows up within ``timeout_s``."""
    import psutil

    def tracker(process) -> bool:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())

    replica = psutil.Process(replica_pid(service, deployment, replica_id))
    deadline = time.monotonic() + timeout_s
    while True:
        workers = []
        try:
            for engine_core in (p for p in replica.children() if not tracker(p)):
                workers += [worker.pid for worker in engine_core.children() if not tracker(worker)]
        except psutil.Error:  # one ended meanwhile: look again
            workers = []
        if workers:
            return sorted(workers)
        seen = [f"{p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:120]}" for p in replica.children(recursive=True)]
        assert time.monotonic() < deadline, f"no rank worker under replica {replica_id} ({replica.pid}): {seen}"
        time.sleep(0.2)


def bound_cores(pid: int, tid: int | None = None) -> set[int]:
    """The cores a process (or one of its threads) may run on (``Cpus_allowed_list`` in /proc/PID/status)."""
    from engine.core_ledger import bound_cores as cores_of

    status = open(f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status").read()
    allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))
    return set(cores_of(allowed.split()[1]))


def cancel_grpc_after(client, ids: list[int], delay_s: float) -> str:
    """A gRPC stream the client cancels ``delay_s`` after the router admitted it (its initial metadata names
    the request), wherever the request is by then. Returns where that was: ``before_output``, ``mid_stream``,
    or ``finished`` (it ended first)."""
    import grpc

    from pdserve_pb.v1 import generate_pb2 as pb

    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=300))
    call = client.stub.Generate(request, timeout=60)
    admitted = dict(call.initial_metadata())  # waits for the router to take it (or the call's deadline)
    assert admitted.get("x-request-id"), f"the request was never admitted: {call.code()} {call.details()}"
    replies, ended = [], []

    def read() -> None:
        try:
            for reply in call:
                replies.append(reply)
            ended.append("finished")
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                ended.append(f"failed: {error.code()} {error.details()}")

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(delay_s)
    ended.append("mid_stream" if replies else "before_output")
    call.cancel()
    reader.join(10)
    assert not reader.is_alive() and not ended[0].startswith("failed"), ended
    return ended[0]


def cancel_http_after(client, ids: list[int], delay_s: float) -> str:
    """An SSE stream whose client goes away (closes the connection) ``delay_s`` after its first event: the
    response starts with the first token, so the request had started. Returns where it was: mid-stream."""
    connection = client.open_stream({"prompt": ids, "max_tokens": 300})
    reply = connection.getresponse()
    assert reply.status == 200, f"the request did not start: HTTP {reply.status} {reply.read()[:200]!r}"
    time.sleep(delay_s)
    connection.close()
    return "mid_stream"


def cancel_at_random(client, count: int, seed: int, longest_prompt: int, latest_s: float, at_once: int) -> dict:
    """``count`` requests, gRPC or HTTP at random, each cancelled at a random point up to ``latest_s`` after
    it started. Returns how many were cut before their first token, mid-stream, or had finished first."""
    import random
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from service_client import prompt

    rng = random.Random(seed)
    plan = [(rng.choice((cancel_grpc_after, cancel_http_after)), prompt(rng.randint(20, longest_prompt), seed + i),
             rng.uniform(0, latest_s)) for i in range(count)]  # fmt: skip
    with ThreadPoolExecutor(at_once) as pool:
        return dict(Counter(pool.map(lambda step: step[0](client, step[1], step[2]), plan)))


# A new replica under load on 2 cores: Ray starts its process (~30 s), then vLLM its engine core and
# worker processes (~25 s idle, ~70 s beside two busy engines).
SCALE_UP_S = 240


def live_workers(client, role: str) -> set[str]:
    return {w.worker_id for w in client.status().workers if w.role == role}


def pools(client) -> dict[str, int]:
    """Live workers per pool, as the router's index sees them."""
    return {role: len(live_workers(client, role)) for role in ("prefill", "decode")}


def wait_pools(client, want: dict[str, int], timeout_s: float) -> float:
    start = time.monotonic()
    while pools(client) != want:
        assert time.monotonic() - start < timeout_s, f"pools {pools(client)}, not {want}, after {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - start


def ramp_each_pool_and_back(client) -> tuple[float, float]:
    """Long prompts (the prefill pool grows first, the decode pool stays), then long generations (the
    decode pool grows), then nothing (both back to one replica), with no request failed. Returns the
    seconds the prefill pool took to grow and both to come back after the load."""
    from service_client import prompt

    assert pools(client) == {"prefill": 1, "decode": 1}
    long_prompts = Load(lambda n: client.greedy(prompt(800, 1000 + n), 1)[2], clients=6).start()
    try:
        grew = wait_pools(client, {"prefill": 2, "decode": 1}, SCALE_UP_S)
    finally:
        long_prompts.stop()
    long_outputs = Load(lambda n: client.greedy(prompt(30, 5000 + n), 300)[2], clients=16).start()
    try:
        wait_for_decode = time.monotonic()
        while pools(client)["decode"] < 2:
            assert time.monotonic() - wait_for_decode < SCALE_UP_S, f"the decode pool did not grow: {pools(client)}"
            time.sleep(0.5)
    finally:
        long_outputs.stop()
    shrank = wait_pools(client, {"prefill": 1, "decode": 1}, 120)
    assert long_prompts.errors == [] and long_outputs.errors == []
    assert all(last.finish_reason == "length" for last in long_prompts.results + long_outputs.results)
    client.wait_idle(10)
    return grew, shrank


def wait_for_replacement(client, role: str, count: int, gone: str, timeout_s: float = 180.0) -> float:
    """Seconds until ``count`` live ``role`` workers report again, none of them ``gone``."""
    start = time.monotonic()
    while True:
        live = live_workers(client, role)
        if len(live) == count and gone not in live:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"no replacement for {gone} within {timeout_s} s: {live}"
        time.sleep(0.5)


@dataclass
class Load:
    """Requests sent back to back from ``clients`` threads until stopped; every outcome recorded."""

    send: Callable[[int], object]  # request number → the request's result (raises on failure)
    clients: int = 4
    results: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._count = iter(range(10**9))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a load client is stuck"

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                number = next(self._count)
            try:
                result = self.send(number)
            except Exception as exc:
                with self._lock:
                    self.errors.append(f"request {number}: {exc!r}"[:500])
            else:
                with self._lock:
                    self.results.append(result)


class WireProxy:
    """A TCP proxy between a receiver and a KV sender that does to what the server sends what a bad link would.

    ``corrupt_at``: flips one byte that far into each connection, as a bad NIC or switch would (far enough in
    to land in block bytes rather than in framing). ``bytes_per_s``: paces it to that rate, as a slow link.
    """

    def __init__(self, target: str, corrupt_at: int | None = None, bytes_per_s: float | None = None):
        import socket

        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._offset = corrupt_at
        self._bytes_per_s = bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.corrupted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target, timeout=30)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source, sink, from_server: bool) -> None:
        seen = 0
        flip_at = self._offset if from_server else None
        pace = self._bytes_per_s if from_server else None
        try:
            while data := source.recv(16384 if pace else 65536):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data = bytearray(data)
                    data[flip_at - seen] ^= 0xFF
                    self.corrupted += 1
                seen += len(data)
                if pace:
                    time.sleep(len(data) / pace)
                sink.sendall(bytes(data))
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        self._listener.close()
