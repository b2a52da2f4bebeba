"""Turn vLLM's KV cache events into pdserve cache events keyed by pdserve's block hash.

vLLM publishes ``BlockStored`` (with the token ids of each block),
``BlockRemoved`` and ``AllBlocksCleared`` over a ZMQ PUB socket. The index
needs keys every machine agrees on, so stored blocks are re-hashed from their
token ids with ``engine.block_hash``; vLLM's own hashes are only remembered to
map a later ``removed`` back to the pdserve hash it was stored under.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_hash import block_hash, root_hash

log = logging.getLogger(__name__)

_GPU_MEDIA = (None, "GPU")  # vLLM calls its primary KV pool "GPU" on every device


@dataclass(frozen=True)
class BlocksStored:
    """Blocks now held, in chain order; ``parent`` is None when the first one starts a chain."""

    hashes: list[bytes]
    parent: bytes | None


@dataclass(frozen=True)
class BlocksRemoved:
    hashes: list[bytes]


@dataclass(frozen=True)
class AllCleared:
    pass


CacheEvent = BlocksStored | BlocksRemoved | AllCleared


class CacheEventTranslator:
    """Stateful vLLM → pdserve event mapping for one engine (not thread-safe)."""

    def __init__(self, model_id: str, block_size: int):
        self._root = root_hash(model_id)
        self._block_size = block_size
        self._by_vllm_hash: dict[int, bytes] = {}
        self.unknown_parents = 0

    def translate(self, event) -> CacheEvent | None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        if isinstance(event, BlockStored):
            return self._stored(event) if event.medium in _GPU_MEDIA else None
        if isinstance(event, BlockRemoved):
            if event.medium not in _GPU_MEDIA:
                return None
            hashes = [self._by_vllm_hash.pop(h) for h in event.block_hashes if h in self._by_vllm_hash]
            return BlocksRemoved(hashes) if hashes else None
        if isinstance(event, AllBlocksCleared):
            self._by_vllm_hash.clear()
            return AllCleared()
        return None

    def _stored(self, event) -> BlocksStored | None:
        if event.parent_block_hash is None:
            parent, chain_parent = self._root, None
        elif event.parent_block_hash in self._by_vllm_hash:
            parent = chain_parent = self._by_vllm_hash[event.parent_block_hash]
        else:
            # The parent was stored before we subscribed: its pdserve hash is unknowable.
            self.unknown_parents += 1
            return None
        size = event.block_size
        if size != self._block_size or len(event.token_ids) != size * len(event.block_hashes):
            log.warning("cache event with unexpected block layout skipped", extra={"block_size": size})
            return None
        hashes = []
        for i, vllm_hash in enumerate(event.block_hashes):
            parent = block_hash(parent, event.token_ids[i * size : (i + 1) * size])
            self._by_vllm_hash[vllm_hash] = parent
            hashes.append(parent)
        return BlocksStored(hashes, chain_parent)


class CacheEventSubscriber:
    """Reads vLLM's ZMQ event stream on a thread and hands translated batches to a callback."""

    _POLL_MS = 100

    def __init__(self, endpoint: str, translator: CacheEventTranslator, on_events: Callable[[list[CacheEvent]], None]):
        import zmq

        self._translator = translator
        self._on_events = on_events
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        # The handshake with vLLM's publisher, seen on a monitor socket: the subscription is sent right after it.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._socket.connect(endpoint)  # before vLLM binds, so no early event is missed
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._next_seq: int | None = None
        self.gaps = 0
        self._thread = threading.Thread(target=self._run, name="pdserve-cache-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(self._POLL_MS))
            if self._monitor in ready:
                self._monitor.recv_multipart()
                self.connected.set()
            if self._socket not in ready:
                continue
            _topic, seq_bytes, payload = self._socket.recv_multipart()
            self._check_sequence(int.from_bytes(seq_bytes, "big"))
            batch = decoder.decode(payload)
            events = [e for e in map(self._translator.translate, batch.events) if e is not None]
            if events:
                try:
                    self._on_events(events)
                except Exception:
                    log.exception("cache event callback failed")

    def _check_sequence(self, seq: int) -> None:
        if self._next_seq is not None and seq != self._next_seq:
            self.gaps += 1
            log.warning("cache events lost", extra={"expected_seq": self._next_seq, "got_seq": seq})
        self._next_seq = seq + 1

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._socket.disable_monitor()
        self._monitor.close()
        self._socket.close()
