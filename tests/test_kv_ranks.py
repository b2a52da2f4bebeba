"""KV between multi-rank engines, rank to rank: which heads each rank holds and pulls, and the bytes that move.

Senders here are real processes holding one tensor-parallel rank's share of a model's KV heads
(``kv_peer``); receivers pull over real sockets with the plan the connector uses (``head_pulls``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from kv_peer import SenderProcess, layer_tensors
from test_kv_channels import BACKENDS, channel_for, same_bytes

from kv_transfer.errors import TransferNotFound
from kv_transfer.lease_keeper import LeaseKeeper
from kv_transfer.transfer import SenderRank, TransferHandle, head_pulls, rank_heads

FULL = dict(layers=3, blocks=16, block_shape=(8, 16, 64), dtype="bfloat16", seed=11)  # 8 KV heads
BLOCKS = [4, 9, 2, 3]


@pytest.fixture
def calls():
    """Where a lease keeper's blocking calls run."""
    with ThreadPoolExecutor(4, thread_name_prefix="test-lease") as pool:
        yield pool


@pytest.fixture
def senders():
    started = []

    def start(**spec) -> SenderProcess:
        started.append(SenderProcess(**{**FULL, **spec}))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def full_layers() -> list[torch.Tensor]:
    return layer_tensors(FULL["layers"], FULL["blocks"], FULL["block_shape"], FULL["dtype"], FULL["seed"])


def engine_handle(transfer_id: str, peers: list[SenderProcess], tp: int) -> TransferHandle:
    """The handle a prefill engine of ``tp`` ranks (one sender process each) gives out."""
    handles = [peer.offer(transfer_id, BLOCKS) for peer in peers]
    ranks = tuple(SenderRank(h.address(), rank_heads(r, tp, 8).start, 8 // tp) for r, h in enumerate(handles))
    fingerprint = dataclasses.replace(handles[0].fingerprint, num_kv_heads=8)
    return dataclasses.replace(handles[0], ranks=ranks, fingerprint=fingerprint)


def receive(handle: TransferHandle, backend: str, heads: range) -> list[torch.Tensor]:
    """What one receiver rank holding ``heads`` ends with, pulled as the connector pulls."""
    dest = [torch.zeros((6, len(heads), 16, 64), dtype=torch.bfloat16) for _ in range(FULL["layers"])]
    channel = channel_for(backend)
    for rank, slice_ in head_pulls(handle.ranks, heads):
        channel.pull(handle, dest, [5, 0, 1, 2], rank=rank, heads=slice_)
    return dest


def test_ranks_hold_vllms_shards_of_the_kv_heads():
    assert [rank_heads(r, 2, 8) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [rank_heads(r, 4, 2) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]


def test_a_receiver_rank_pulls_each_head_it_holds_once_from_a_rank_that_holds_it():
    two = (SenderRank("a", 0, 4), SenderRank("b", 4, 4))
    assert [(r, (s.source, s.dest, s.count)) for r, s in head_pulls(two, range(0, 8))] == [
        (0, (0, 0, 4)),
        (1, (0, 4, 4)),
    ]
    assert [(r, (s.source, s.dest, s.count)) for r, s in head_pulls(two, range(4, 6))] == [(1, (0, 0, 2))]
    replicated = (SenderRank("a", 0, 1), SenderRank("b", 0, 1), SenderRank("c", 1, 1), SenderRank("d", 1, 1))
    assert [r for r, _ in head_pulls(replicated, range(0, 2))] == [0, 2]
    with pytest.raises(ValueError, match="do not hold heads"):
        head_pulls((SenderRank("a", 0, 4),), range(0, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_prefill_ranks_to_one_decode_rank_gathers_every_head(senders, backend):
    handle = engine_handle("tp2-tp1", [senders(heads=(0, 4)), senders(heads=(4, 4))], tp=2)
    dest = receive(handle, backend, range(0, 8))
    for layer, full in zip(dest, full_layers(), strict=True):
        assert same_bytes(layer[[5, 0, 1, 2]], full[BLOCKS])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_prefill_rank_to_two_decode_ranks_slices_each_its_heads(senders, backend):
    handle = engine_handle("tp1-tp2", [senders()], tp=1)
    halves = [receive(handle, backend, rank_heads(r, 2, 8)) for r in range(2)]
    for layer, full in enumerate(full_layers()):
        for rank, dest in enumerate(halves):
            assert same_bytes(dest[layer][[5, 0, 1, 2]], full[BLOCKS][:, 4 * rank : 4 * rank + 4])


def test_an_offer_read_by_two_receiver_ranks_is_freed_at_the_second_release(senders):
    peer = senders()
    handle = engine_handle("two-readers", [peer], tp=1)
    channel = channel_for("grpc")
    assert channel.release(handle, receivers=2).state.name == "OFFERED"  # the other rank may still pull
    assert channel.release(handle, receivers=2).state.name == "DONE"
    assert peer.wait_freed("two-readers") == "DONE"


def test_a_puller_that_renews_keeps_the_offer_past_its_lease_and_a_silent_one_lets_it_expire(senders):
    peer = senders(lease_s=1.0)
    handle = engine_handle("renewed", [peer], tp=1)
    channel = channel_for("grpc")
    for _ in range(8):  # 2 s: twice the lease
        assert channel.renew(handle).state.name == "OFFERED"
        time.sleep(0.25)
    assert peer.status("renewed")[0] == "OFFERED"
    stopped = time.monotonic()
    assert peer.wait_freed("renewed", timeout_s=5) == "EXPIRED"
    assert time.monotonic() - stopped < 1.0 + 0.5  # within one lease period (plus the reaper's tick)


def test_a_decode_worker_waiting_past_the_lease_keeps_the_blocks_of_every_rank(senders, calls):
    peers = [senders(lease_s=1.0, heads=(0, 4)), senders(lease_s=1.0, heads=(4, 4))]
    handle = engine_handle("queued", peers, tp=2)

    async def wait_then_pull() -> int:
        keeper = LeaseKeeper(channel_for("grpc"), handle, 1.0, calls).start()
        await asyncio.sleep(2.5)  # queued in the decode engine for two and a half leases
        await keeper.stop()
        return keeper.renewals

    assert asyncio.run(wait_then_pull()) >= 2
    assert [peer.status("queued")[0] for peer in peers] == ["OFFERED", "OFFERED"]
    dest = receive(handle, "grpc", range(0, 8))
    assert same_bytes(dest[0][[5, 0, 1, 2]], full_layers()[0][BLOCKS])


def test_a_request_given_up_before_its_kv_came_frees_every_prefill_rank_at_once(senders, calls):
    peers = [senders(heads=(0, 4)), senders(heads=(4, 4))]  # 30 s leases
    handle = engine_handle("refused", peers, tp=2)

    async def refuse() -> None:
        keeper = LeaseKeeper(channel_for("grpc"), handle, 1.0, calls).start()
        await asyncio.sleep(0.1)
        await keeper.stop(abort=True)

    asyncio.run(refuse())
    assert [peer.wait_freed("refused", timeout_s=2) for peer in peers] == ["ABORTED", "ABORTED"]


def test_renewing_a_transfer_not_offered_yet_answers_at_once(senders):
    peer = senders()  # waits 5 s for an offer on every other call
    handle = dataclasses.replace(engine_handle("offered", [peer], tp=1), transfer_id="not-yet")
    start = time.monotonic()
    with pytest.raises(TransferNotFound, match="unknown transfer"):
        channel_for("grpc").renew(handle)
    assert time.monotonic() - start < 1.0  # no server thread held waiting for the prefill to offer it
