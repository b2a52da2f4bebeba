"""The sender's registry: one state per transfer, leases, and blocks freed exactly once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import wait_for

from kv_transfer.errors import TransferNotFound, TransferRequestError, TransferTimeout
from kv_transfer.transfer import TransferRegistry, TransferState


@pytest.fixture
def freed():
    return []


@pytest.fixture
def registry(freed):
    registry = TransferRegistry("addr", "m", lease_s=30, on_freed=lambda tid, state: freed.append((tid, state)))
    yield registry
    registry.close()


def offer(registry, transfer_id="t", **kwargs):
    layers = [torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8) + 100 * i for i in range(2)]
    return registry.offer(transfer_id, layers, [3, 1], [b"a" * 16, b"b" * 16], 32, **kwargs)


def test_an_offer_describes_its_blocks_in_its_handle(registry):
    handle = offer(registry)
    assert (handle.address(), handle.num_blocks, handle.num_layers, handle.dtype) == ("addr", 2, 2, "float32")
    assert handle.block_shape() == (8,)
    assert registry.status("t").state == TransferState.OFFERED


def test_a_pull_moves_the_state_to_pulling_and_back(registry):
    offer(registry)
    reading = registry.open_pull("t", [], [])
    assert registry.status("t").state == TransferState.PULLING
    assert torch.equal(
        torch.cat(registry.read_blocks(reading, 1, [1])), torch.arange(8, 16, dtype=torch.float32)[None] + 100
    )
    registry.close_pull(reading, 64)
    status = registry.status("t")
    assert (status.state, status.bytes_sent) == (TransferState.OFFERED, 64)


def test_an_abort_during_a_pull_frees_the_blocks_only_when_the_pull_lets_go(registry, freed):
    offer(registry)
    reading = registry.open_pull("t", [], [])
    assert registry.abort("t").state == TransferState.ABORTED
    assert freed == []
    with pytest.raises(TransferNotFound, match="aborted while being pulled"):
        registry.read_blocks(reading, 0, [])
    registry.close_pull(reading, 0)
    assert freed == [("t", TransferState.ABORTED)]


def test_a_lease_that_runs_out_mid_pull_expires_when_the_pull_ends(freed):
    registry = TransferRegistry("addr", "m", lease_s=0.1, on_freed=lambda tid, state: freed.append((tid, state)))
    try:
        offer(registry)
        reading = registry.open_pull("t", [], [])
        time.sleep(0.3)
        assert freed == []
        registry.close_pull(reading, 0)
        assert freed == [("t", TransferState.EXPIRED)]
    finally:
        registry.close()


def test_final_states_are_remembered_and_freed_once(registry, freed):
    offer(registry)
    registry.release("t")
    assert registry.abort("t").state == TransferState.DONE
    assert registry.status("t").state == TransferState.DONE
    assert freed == [("t", TransferState.DONE)]
    with pytest.raises(TransferNotFound, match="already done"):
        registry.open_pull("t", [], [])


def test_out_of_range_blocks_or_layers_are_refused(registry):
    offer(registry)
    with pytest.raises(TransferRequestError, match=r"block indices must be in \[0, 2\)"):
        registry.open_pull("t", [2], [])
    with pytest.raises(TransferRequestError, match=r"layers must be in \[0, 2\)"):
        registry.open_pull("t", [], [5])


def test_waiting_for_a_layer_that_never_comes_times_out(registry):
    offer(registry, layers_ready=1)
    reading = registry.open_pull("t", [], [])
    with pytest.raises(TransferTimeout, match="layer 1 of block 1 not computed within 0.1 s"):
        registry.wait_layer_ready(reading, 1, 0.1)
    registry.close_pull(reading, 0)


def test_a_transfer_id_is_offered_once(registry):
    offer(registry)
    with pytest.raises(ValueError, match="offered already"):
        offer(registry)


def test_an_abort_before_the_offer_refuses_the_offer_when_it_comes(registry):
    assert registry.abort("early").state == TransferState.ABORTED  # the handle went out up front
    with pytest.raises(ValueError, match="aborted before it was offered"):
        offer(registry, "early")  # the connector frees the blocks at once instead of holding them a lease
    with pytest.raises(TransferNotFound, match="already aborted"):
        registry.open_pull("early", [], [])
    assert registry.active() == []


def test_closing_the_sender_aborts_what_it_still_holds(freed):
    registry = TransferRegistry("addr", "m", on_freed=lambda tid, state: freed.append((tid, state)))
    offer(registry, "a")
    offer(registry, "b")
    registry.close()
    assert sorted(freed) == [("a", TransferState.ABORTED), ("b", TransferState.ABORTED)]


def test_stats_count_open_and_finished_transfers_and_bytes(registry):
    offer(registry, "a")
    offer(registry, "b")
    reading = registry.open_pull("a", [], [])
    registry.close_pull(reading, 128)
    registry.release("a")
    stats = registry.stats()
    assert (stats.open, stats.finished, stats.bytes_sent) == ({"offered": 1}, {"done": 1}, 128)


def chunked_offer(registry, transfer_id="c"):
    """A prompt of four blocks computed in chunks: block ids for the first two so far, the first being computed."""
    layers = [torch.arange(8 * 8, dtype=torch.float32).reshape(8, 8) + 100 * i for i in range(2)]
    hashes = [bytes([i]) * 16 for i in range(4)]
    return registry.offer(transfer_id, layers, [5, 2], hashes, 64, layers_ready=0, segment=1)


def test_a_pull_of_a_chunked_prompt_is_served_the_blocks_computed_so_far(registry):
    chunked_offer(registry)
    reading = registry.open_pull("c", [], [])
    assert registry.next_batch(reading, [0, 1, 2, 3], 0.1) == [0]
    with pytest.raises(TransferTimeout, match="layer 0 of block 0 not computed"):
        registry.wait_layer_ready(reading, 0, 0.1, last_block=0)
    registry.mark_layer_ready("c", 0)
    assert registry.wait_layer_ready(reading, 0, 0.1, last_block=0)
    with pytest.raises(TransferTimeout, match="block 1 not computed"):
        registry.next_batch(reading, [1, 2, 3], 0.1)  # the next chunk has not started
    registry.close_pull(reading, 0)


def test_the_next_chunk_makes_the_last_one_whole_and_its_own_blocks_readable_layer_by_layer(registry):
    chunked_offer(registry)
    registry.mark_layer_ready("c", 0)
    registry.extend("c", [7, 3], segment_end=4)  # block 1 was partial; the chunk finishes the prompt
    reading = registry.open_pull("c", [], [])
    assert registry.next_batch(reading, [1, 2, 3], 0.1) == [1, 2, 3]
    assert registry.wait_layer_ready(reading, 1, 0.1, last_block=0)  # the first chunk is whole
    with pytest.raises(TransferTimeout):
        registry.wait_layer_ready(reading, 0, 0.1, last_block=3)
    registry.mark_layer_ready("c", 1)
    assert registry.wait_layer_ready(reading, 1, 0.1, last_block=3)
    assert torch.equal(torch.cat(registry.read_blocks(reading, 0, [2, 3])), torch.arange(64.0).reshape(8, 8)[[7, 3]])
    registry.close_pull(reading, 0)


def test_an_offer_notes_when_its_kv_was_all_computed(registry):
    chunked_offer(registry)
    registry.mark_layer_ready("c", 1)
    assert registry.status("c").computed_at == registry.status("c").last_step_at == 0.0  # the first chunk only
    before = time.time()
    registry.extend("c", [7, 3], segment_end=4)
    registry.mark_layer_ready("c", 1)
    assert before <= registry.status("c").computed_at <= time.time()


def test_a_chunk_beyond_the_transfer_or_behind_the_last_is_refused(registry):
    chunked_offer(registry)
    with pytest.raises(ValueError, match="segment to block 5"):
        registry.extend("c", [7, 3, 9], segment_end=5)
    with pytest.raises(ValueError, match="segment to block 0"):
        registry.extend("c", [], segment_end=0)


def test_a_pull_asks_for_blocks_in_ascending_order(registry):
    chunked_offer(registry)
    with pytest.raises(TransferRequestError, match="ascend"):
        registry.open_pull("c", [2, 1], [])


def test_withdrawing_an_offer_waits_for_its_readers_to_let_go(registry, freed):
    chunked_offer(registry)
    reading = registry.open_pull("c", [], [])
    threading.Timer(0.2, registry.close_pull, (reading, 0)).start()
    started = time.monotonic()
    assert registry.withdraw("c", timeout_s=5)
    assert 0.15 < time.monotonic() - started < 2  # returned once the reader let go, not before
    wait_for(lambda: freed == [("c", TransferState.ABORTED)], 1)  # freed by the reader's thread as it lets go


def test_withdrawing_an_offer_a_stuck_reader_holds_says_so_at_its_deadline(registry):
    chunked_offer(registry)
    reading = registry.open_pull("c", [], [])
    assert not registry.withdraw("c", timeout_s=0.1)
    registry.close_pull(reading, 0)
