"""A real engine in its own process (a prefill or decode worker stand-in), driven over a pipe.

Used by the transfer, engine and simulator benchmarks and the connector tests.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time


def _engine_main(conn, config_json: str, env: dict) -> None:
    os.environ.update(env)
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.types import GenerateRequest, SamplingOptions

    engine = Engine(EngineConfig.model_validate_json(config_json))
    conn.send(("ready", engine.vocab_size))

    async def run(request: GenerateRequest):
        deltas = [d async for d in engine.generate(request)]
        tokens = [t for d in deltas for t in d.token_ids]
        return tokens, deltas[-1].kv_transfer_params, deltas[0].cached_prompt_tokens, deltas[-1].finish_reason

    while conn.poll(300):
        command, *args = conn.recv()
        if command == "generate":
            request_id, ids, max_tokens, params = args
            sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            try:
                conn.send(("result", asyncio.run(run(GenerateRequest(request_id, ids, sampling, params)))))
            except Exception as exc:
                conn.send(("error", repr(exc)))
        elif command == "kv_handle":
            from kv_transfer.handoff import SenderInfo, transfer_handle

            senders = [SenderInfo.from_dict(rank) for rank in engine.kv_connector_handshake()]
            conn.send(("kv_handle", transfer_handle(senders, engine.block_size, *args)))
        elif command == "transfer_stats":
            conn.send(("transfer_stats", engine.kv_transfer_stats()))
        elif command == "transfer_times":
            conn.send(("transfer_times", engine.kv_transfer_times(*args)))
        elif command == "stats":
            stats = engine.stats()
            conn.send(("stats", stats.kv_blocks_used, stats.running, stats.waiting))
        elif command == "stop":
            break
    engine.shutdown()


def _call_and_send(conn, function, args) -> None:
    try:
        conn.send(("ok", function(*args)))
    except Exception as exc:  # sent whole, so the caller raises it; as text when it does not pickle
        try:
            conn.send(("error", exc))
        except Exception:
            conn.send(("error", RuntimeError(repr(exc))))


def call_in_fresh_process(function, *args, timeout_s: float = 900.0):
    """``function(*args)`` in a spawned process of its own, as a worker runs an engine; its result or its error.

    Not a pool: a pool's processes are daemons, and a daemon may not start vLLM's engine core."""
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_call_and_send, args=(sending, function, args))
    process.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not receiving.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"{function.__name__}'s process died (exit code {process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{function.__name__} gave no answer within {timeout_s:g} s")
        status, value = receiving.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(10)
    if status == "error":
        raise value
    return value


class ChildProcess:
    """A spawned process driven over a pipe; ``kill`` is a real SIGKILL."""

    def __init__(self, target, *args):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        # Not a daemon: vLLM's engine core is a child of this process (it dies with it: engine/vllm_plugin.py).
        self.process = context.Process(target=target, args=(child, *args))
        self.process.start()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def freeze(self) -> None:
        """SIGSTOP: the process holds its sockets open and answers nothing, like a hung peer."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_peers([self], timeout_s)

    def ask_to_stop(self) -> None:
        """The stop without its wait: several processes (each ~5 s for vLLM's own) end side by side."""
        if self.process.is_alive():
            self._conn.send(("stop",))


class EnginePeer(ChildProcess):
    """One engine in its own process. ``wait=False`` returns once the process is spawned, and ``ready`` waits
    for the engine: several started that way load side by side (``start_peers``)."""

    def __init__(self, config, env: dict[str, str], wait: bool = True):
        super().__init__(_engine_main, config.model_dump_json(), env)
        self.vocab_size = 0
        if wait:
            self.ready()

    def ready(self, timeout_s: float = 180.0) -> None:
        self.vocab_size = self._expect("ready", timeout_s)[0]

    def generate(self, request_id: str, ids: list[int], max_tokens: int, params: dict | None = None, timeout=120):
        """(tokens, kv_transfer_params of the last delta, cached prompt tokens, finish reason)."""
        self.submit(request_id, ids, max_tokens, params)
        return self.result(timeout)

    def submit(self, request_id: str, ids: list[int], max_tokens: int, params: dict | None = None) -> None:
        """Start a request without waiting; ``result`` collects it (one at a time)."""
        self._conn.send(("generate", request_id, ids, max_tokens, params))

    def result(self, timeout: float = 120):
        return self._expect("result", timeout)[0]

    def kv_handle(self, transfer_id: str, block_hashes: list[str], num_tokens: int) -> str | None:
        """The handle of a transfer this engine will produce, before it runs the prompt."""
        self._conn.send(("kv_handle", transfer_id, block_hashes, num_tokens))
        return self._expect("kv_handle")[0]

    def transfer_stats(self) -> dict:
        """The connector's figures summed over the ranks (``Engine.kv_transfer_stats``)."""
        self._conn.send(("transfer_stats",))
        return self._expect("transfer_stats")[0]

    def transfer_times(self, transfer_id: str) -> list[dict[str, float]]:
        """Per rank, when its part of a recent transfer happened (``Engine.kv_transfer_times``)."""
        self._conn.send(("transfer_times", transfer_id))
        return self._expect("transfer_times")[0]

    def kv_blocks_used(self) -> int:
        self._conn.send(("stats",))
        return self._expect("stats")[0]

    def _expect(self, kind: str, timeout_s: float = 60.0):
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"engine process did not answer {kind!r} within {timeout_s} s")
        message = self._conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"engine process: {message[1]}")
        assert message[0] == kind, message
        return message[1:]


def start_peers(configs: dict[str, tuple], timeout_s: float = 300.0) -> dict[str, EnginePeer]:
    """``{name: (config, env)}`` → the engines, loaded side by side; none left running if one fails."""
    peers = {name: EnginePeer(config, env, wait=False) for name, (config, env) in configs.items()}
    try:
        deadline = time.monotonic() + timeout_s
        for peer in peers.values():
            peer.ready(max(1.0, deadline - time.monotonic()))
    except BaseException:
        stop_peers(peers.values())
        raise
    return peers


def stop_peers(peers, timeout_s: float = 30.0) -> None:
    """Stop every process, side by side; one still running at the deadline is killed."""
    peers = list(peers)
    for peer in peers:
        peer.ask_to_stop()
    deadline = time.monotonic() + timeout_s
    for peer in peers:
        peer.process.join(max(0.0, deadline - time.monotonic()))
        if peer.process.is_alive():
            peer.kill()
