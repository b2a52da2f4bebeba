"""The simulated engine's KV connector: pdserve's real transfer path over a stand-in cache.

The simulated engine (engine/sim/engine.py) loads it by module path from its config, as vLLM loads
pdserve's vLLM connector (the composition names it by ``engine.kind``).

Offers under leases (``TransferRegistry``), the sender's KV server, the puller's gRPC channel, its
releases and aborts, the decode worker's lease renewals: all the same code a vLLM worker's connector
runs, with the same states and failures. Only the cache is a stand-in: one byte per token of each
block (one layer, one head, a numpy array: a simulated worker never imports torch), so a pull moves
real bytes between real processes, and the puller then waits the time the hardware profile gives the
prompt's KV on its link.

The sender offers a prompt's blocks as the scheduler admits it and marks them computed step by step,
so a decode worker may start pulling before the prefill ends, as with vLLM's connector.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from kv_transfer.channel import GrpcKVChannel
from kv_transfer.errors import TransferError
from kv_transfer.grpc_service import KVTransferServer
from kv_transfer.handoff import (
    DEFAULT_LEASE_S,
    DEFAULT_PULL_TIMEOUT_S,
    PULLED_TOKENS_KEY,
    TOKEN_ENV,
    SenderInfo,
    failure_cause,
    kv_tls,
    transfer_handle,
    usable_handle,
)
from kv_transfer.transfer import KVFingerprint, TransferHandle, TransferRegistry

log = logging.getLogger(__name__)

CACHE_LAYOUT = "simulated"


class SimulatedKV:
    """One simulated engine's side of the hand-off: a sender (``kv_producer``) or a puller (``kv_consumer``)."""

    def __init__(self, role: str, extra: dict, model_id: str, num_blocks: int, block_size: int,
                 link_s: Callable[[int], float], on_freed: Callable[[str], None]):  # fmt: skip
        if kv_tls(extra) is not None:
            raise ValueError("kv_connector.extra: the simulated engine moves its stand-in KV without TLS")
        secret = os.environ.get(TOKEN_ENV)
        if not secret:
            raise ValueError(f"{TOKEN_ENV} must be set: KV transfers need the cluster token")
        self.role = role
        self._link_s = link_s  # the seconds a prompt's KV of so many tokens takes on the link
        self._block_size = block_size
        self._stall_timeout_s = float(extra.get("stall_timeout_s", 5.0))
        self._pull_timeout_s = float(extra.get("pull_timeout_s", DEFAULT_PULL_TIMEOUT_S))
        self.layers = [np.zeros((num_blocks, 1, block_size, 1), dtype=np.uint8)]
        self.fingerprint = KVFingerprint(
            model_id, "simulated", "uint8", 1, 1, (block_size, 1), CACHE_LAYOUT, int(extra.get("hash_scheme", 0))
        )
        self._registry = self._server = None
        self._channel = GrpcKVChannel(secret)
        self._pullers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pdserve-sim-pull")
        self._pulls = {"pulls": 0, "failures": 0, "bytes": 0, "seconds": 0.0}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()  # the figures, counted from the pull threads
        if role in ("kv_producer", "kv_both"):
            lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
            self._registry = TransferRegistry("", model_id, lease_s, on_freed=lambda tid, state: on_freed(tid))
            host = extra.get("host", "127.0.0.1")
            self._server = KVTransferServer(
                self._registry, secret, host, 0, self._stall_timeout_s, torch_dist=False
            ).start()

    def handshake(self) -> list[dict]:
        """This engine's one rank, as a vLLM worker's connector describes it (a puller has no address)."""
        address = self._server.address if self._server is not None else ""
        return [asdict(SenderInfo(address, 0, 1, self.fingerprint, ("grpc",)))]

    # ----- the sender's side ----------------------------------------------------------------

    def offer(self, transfer_id: str, block_ids: list[int], block_hashes: list[bytes], num_tokens: int,
              segment_end: int) -> bool:  # fmt: skip
        """Offer a prompt's first blocks as its first chunk runs; False: refused (aborted before, or a reused id)."""
        try:
            self._registry.offer(
                transfer_id, self.layers, block_ids, block_hashes, num_tokens, CACHE_LAYOUT, layers_ready=0,
                segment=segment_end,
            )  # fmt: skip
        except ValueError as exc:
            log.warning("transfer %s not offered: %s", transfer_id, exc)
            return False
        return True

    def extend(self, transfer_id: str, block_ids: list[int], segment_end: int) -> None:
        """The prompt's next chunk runs, over ``block_ids`` allocated since."""
        try:
            self._registry.extend(transfer_id, block_ids, segment_end)
        except (TransferError, ValueError) as exc:  # aborted or expired meanwhile: nobody reads it
            log.info("transfer %s not extended: %s", transfer_id, exc)

    def computed(self, transfer_id: str) -> None:
        """The step that ran the current chunk ended: its blocks are readable."""
        try:
            self._registry.mark_layer_ready(transfer_id, 0)
        except TransferError:
            pass

    def abort(self, transfer_id: str) -> None:
        if self._registry is not None:
            try:
                self._registry.abort(transfer_id)
            except TransferError:  # released or expired already
                pass

    def open_transfers(self) -> int:
        return len(self._registry.active()) if self._registry is not None else 0

    def offered_params(self, transfer_id: str, block_hashes_hex: list[str], num_tokens: int) -> dict:
        """A finished producer's ``kv_transfer_params``: its handle, as vLLM's connector gives it."""
        senders = [SenderInfo.from_dict(rank) for rank in self.handshake()]
        return {"pdserve_handle": transfer_handle(senders, self._block_size, transfer_id, block_hashes_hex, num_tokens)}

    # ----- the puller's side ----------------------------------------------------------------

    usable_handle = staticmethod(usable_handle)  # for the engine, which does not import kv_transfer/

    @staticmethod
    def pulled_params(tokens: int) -> dict:
        """A finished consumer's ``kv_transfer_params``: the prompt tokens whose KV it loaded."""
        return {PULLED_TOKENS_KEY: tokens}

    def pull(self, handle: TransferHandle, block_indices: list[int], dest_block_ids: list[int],
             done: Callable[[bool], None]) -> None:  # fmt: skip
        """In the background: pull the blocks, wait their time on the link, tell the sender, then ``done(ok)``."""
        self._pullers.submit(self._pull, handle, block_indices, dest_block_ids, done)

    def _pull(self, handle, block_indices, dest_block_ids, done) -> None:
        cause = None
        start = time.monotonic()
        nbytes = 0
        try:
            handle.fingerprint.check_compatible(handle.transfer_id, self.fingerprint)
            result = self._channel.pull(
                handle, self.layers, dest_block_ids, block_indices, stall_timeout_s=self._stall_timeout_s,
                timeout_s=self._pull_timeout_s,
            )  # fmt: skip
            nbytes = result.bytes
            time.sleep(self._link_s(len(block_indices) * self._block_size))
        except TransferError as exc:
            cause = failure_cause(exc)
            log.warning("KV load failed (%s), recomputing locally: %s", cause, exc)
        except Exception:
            cause = "other"
            log.exception("KV load failed, recomputing locally")
        self._count(nbytes, time.monotonic() - start, cause)
        try:
            if cause is None:
                self._channel.release(handle, self._stall_timeout_s)
            else:
                self._channel.abort(handle, self._stall_timeout_s)
        except TransferError as exc:
            log.info("could not tell the sender to free %s: %s", handle.transfer_id, exc)
        done(cause is None)

    def _count(self, nbytes: int, seconds: float, cause: str | None) -> None:
        with self._lock:
            self._pulls["pulls"] += 1
            self._pulls["failures"] += int(cause is not None)
            self._pulls["bytes"] += nbytes
            self._pulls["seconds"] += seconds
            if cause is not None:
                self._failures[cause] = self._failures.get(cause, 0) + 1

    # ----- both ---------------------------------------------------------------------------

    def stats(self) -> dict[str, dict]:
        """As a vLLM worker's connector reports them: pulls, failed loads per cause, offers by final state."""
        offers = dict(self._registry.stats().finished) if self._registry is not None else {}
        with self._lock:
            pulls = {"grpc": dict(self._pulls)} if self._pulls["pulls"] else {}
            return {"pulls": pulls, "failures": dict(self._failures), "offers": offers}

    def close(self) -> None:
        self._pullers.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            self._server.stop()
        if self._registry is not None:
            self._registry.close()
        self._channel.close()
