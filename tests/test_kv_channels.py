"""KV channels between two real processes over real sockets, and every failure they must survive."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from helpers import wait_for
from kv_peer import SECRET, SenderProcess, block_hashes, layer_tensors, start_receiver, token_major

from kv_transfer import auth, dist_channel
from kv_transfer.channel import GrpcKVChannel, LocalKVChannel
from kv_transfer.dist_channel import PHASES, DistKVChannel, word_sum
from kv_transfer.errors import (
    TransferDenied,
    TransferError,
    TransferIntegrityError,
    TransferLayoutError,
    TransferNotFound,
    TransferTimeout,
    TransferUnavailable,
    TransferVersionError,
)
from kv_transfer.grpc_service import KVTransferServer
from kv_transfer.transfer import (
    WIRE_VERSION,
    HeadSlice,
    KVFingerprint,
    SenderRank,
    TransferHandle,
    TransferRegistry,
    TransferState,
)
from pdserve_pb.v1 import kv_transfer_pb2 as pb
from pdserve_pb.v1 import kv_transfer_pb2_grpc as pb_grpc

LLAMA_LIKE = dict(layers=4, blocks=24, block_shape=(8, 16, 256), seed=7)  # 8 KV heads, 16 tokens, K|V of 128


@pytest.fixture
def sender():
    senders = []

    def start(**spec) -> SenderProcess:
        senders.append(SenderProcess(**spec))
        return senders[-1]

    yield start
    for process in senders:
        process.stop()


BACKENDS = ["grpc", "torch_dist"]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: the CUDA-tensor paths run on a GPU machine"
)


def channel_for(backend: str, secret: str = SECRET):
    control = GrpcKVChannel(secret, max_chunk_bytes=64 << 10)
    return control if backend == "grpc" else DistKVChannel(control)


def empty_like(handle: TransferHandle, blocks: int | None = None) -> list[torch.Tensor]:
    shape = (blocks or handle.num_blocks, *handle.block_shape())
    return [torch.zeros(shape, dtype=getattr(torch, handle.dtype)) for _ in range(handle.num_layers)]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_round_trip_between_processes_is_byte_identical(sender, dtype, backend):
    peer = sender(dtype=dtype, **LLAMA_LIKE)
    source_ids = [5, 3, 17, 0, 9, 10, 11, 23]
    handle = peer.offer("t1", source_ids)
    dest = empty_like(handle, blocks=16)
    dest_ids = [15, 14, 13, 12, 2, 4, 6, 8]
    result = channel_for(backend).pull(handle, dest, dest_ids)
    source = peer.layers()
    for layer in range(handle.num_layers):
        assert same_bytes(dest[layer][dest_ids], source[layer][source_ids])
    untouched = [i for i in range(16) if i not in dest_ids]
    assert all(torch.count_nonzero(dest[layer][untouched]) == 0 for layer in range(handle.num_layers))
    assert result.bytes == sum(t[source_ids].numel() * t.element_size() for t in source)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dest_ids", [[4, 5, 6], [9, 2, 7]], ids=["adjacent", "scattered"])
@pytest.mark.parametrize(
    "heads", [None, HeadSlice(2, 0, 4), HeadSlice(2, 4, 4)], ids=["all-heads", "head-slice", "into-a-head-slice"]
)
@pytest.mark.parametrize("sender_device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_caches_in_the_gpu_layout_move_byte_for_byte(sender, backend, dest_ids, heads, sender_device):
    """On GPUs vLLM keeps tokens before heads in memory; the connector sees a logical view that is not
    contiguous, on both ends (a tensor-parallel receiver lands a slice of the sender's heads, in its own cache's
    first heads or further in)."""
    peer = sender(token_major=True, dtype="bfloat16", device=sender_device, **LLAMA_LIKE)
    handle = peer.offer("nhd", [1, 2, 3])
    held = handle.block_shape()[0]
    pulled = heads or HeadSlice(0, 0, held)
    dest_heads = held if heads is None else pulled.dest + pulled.count
    dest = [
        token_major(torch.zeros((12, dest_heads, *handle.block_shape()[1:]), dtype=torch.bfloat16)) for _ in range(4)
    ]
    channel_for(backend).pull(handle, dest, dest_ids, heads=heads)
    source = peer.layers()
    assert all(not layer.is_contiguous() for layer in dest)
    landed = slice(pulled.dest, pulled.dest + pulled.count)
    for layer in range(4):
        assert same_bytes(
            dest[layer][dest_ids, landed], source[layer][[1, 2, 3], pulled.source : pulled.source + pulled.count]
        )
        untouched = dest[layer].clone()
        untouched[dest_ids, landed] = 0
        assert torch.count_nonzero(untouched) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_requested_subset_of_blocks_crosses(sender, backend):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("subset", list(range(10)))
    dest = empty_like(handle, blocks=3)
    result = channel_for(backend).pull(handle, dest, [0, 1, 2], block_indices=[7, 8, 9])
    source = peer.layers()
    assert all(same_bytes(dest[layer], source[layer][7:10]) for layer in range(handle.num_layers))
    assert result.bytes == 3 * handle.num_layers * source[0][0].numel() * 4
    assert peer.status("subset") == ("OFFERED", result.bytes)


def test_release_frees_the_blocks_on_the_sender(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("rel", [1, 2])
    channel = GrpcKVChannel(SECRET)
    channel.pull(handle, empty_like(handle), [0, 1])
    assert channel.release(handle).state == TransferState.DONE
    assert peer.wait_freed("rel") == "DONE"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_concurrent_transfers_to_two_receivers(sender, backend):
    peer = sender(**LLAMA_LIKE)
    handles = [peer.offer(f"c{i}", [i, i + 8, i + 16]) for i in range(8)]
    receivers = [channel_for(backend), channel_for(backend)]
    source = peer.layers()

    def pull(i: int) -> bool:
        dest = empty_like(handles[i])
        receivers[i % 2].pull(handles[i], dest, [0, 1, 2])
        receivers[i % 2].release(handles[i])
        return all(same_bytes(dest[layer], source[layer][[i, i + 8, i + 16]]) for layer in range(4))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(pull, range(8)))
    assert sorted(peer.wait_freed(f"c{i}") for i in range(8)) == ["DONE"] * 8


def test_a_layerwise_pull_follows_the_layers_as_they_become_ready(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("lw", [4, 5, 6], layers_ready=1)
    dest = empty_like(handle)
    done = threading.Event()
    result = {}

    def pull():
        result["r"] = GrpcKVChannel(SECRET).pull(handle, dest, [0, 1, 2], stall_timeout_s=5)
        done.set()

    threading.Thread(target=pull, daemon=True).start()
    for layer in range(1, 4):
        time.sleep(0.3)
        assert not done.is_set(), "the pull finished before every layer was ready"
        peer.mark_layer_ready("lw", layer)
    assert done.wait(10)
    source = peer.layers()
    assert all(same_bytes(dest[layer], source[layer][[4, 5, 6]]) for layer in range(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_of_the_sender_mid_pull_fails_the_receiver_within_the_deadline(sender, backend):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("doomed", [1, 2, 3], layers_ready=1)  # layer 1 never comes: the pull waits mid-stream
    errors = []
    receiver = channel_for(backend)

    def pull():
        try:
            receiver.pull(handle, empty_like(handle), [0, 1, 2], stall_timeout_s=5)
        except Exception as exc:
            errors.append(exc)

    puller = threading.Thread(target=pull, daemon=True)
    puller.start()
    time.sleep(0.5)
    started = time.monotonic()
    peer.kill()
    puller.join(10)
    assert not puller.is_alive(), "the receiver hung after the sender died"
    assert isinstance(errors[0], TransferUnavailable | TransferTimeout)
    assert time.monotonic() - started < 5.5

    fresh = sender(**LLAMA_LIKE)
    again = fresh.offer("after", [1, 2, 3])
    dest = empty_like(again)
    receiver.pull(again, dest, [0, 1, 2])  # the same receiver, a new pair
    assert same_bytes(dest[0], fresh.layers()[0][[1, 2, 3]])


def test_sigkill_of_the_receiver_mid_pull_lets_the_sender_recover():
    registry = TransferRegistry("", "m", lease_s=30)
    server = KVTransferServer(registry, SECRET, stall_timeout_s=30).start()
    try:
        layers = layer_tensors(4, 8, (8, 16, 64), "float32", 0)
        handle = registry.offer("orphan", layers, [0, 1], block_hashes(2), 32, layers_ready=1)
        receiver = start_receiver(handle)
        wait_for(lambda: registry.status("orphan").state == TransferState.PULLING, 30)
        receiver.kill()
        receiver.join(10)
        # The sender notices the dead stream, ends the pull, and keeps the blocks under the lease.
        wait_for(lambda: registry.status("orphan").state == TransferState.OFFERED, 5)
        for layer in range(1, 4):
            registry.mark_layer_ready("orphan", layer)
        dest = [torch.zeros((2, 8, 16, 64)) for _ in range(4)]
        GrpcKVChannel(SECRET).pull(handle, dest, [0, 1])
        assert torch.equal(dest[3], layers[3][[0, 1]])
    finally:
        server.stop()
        registry.close()


def test_a_corrupted_chunk_fails_the_pull_and_nothing_is_kept(sender):
    peer = sender(corrupt=True, **LLAMA_LIKE)
    handle = peer.offer("bad", [1, 2])
    dest = empty_like(handle)
    with pytest.raises(TransferIntegrityError, match="checksum mismatch"):
        GrpcKVChannel(SECRET).pull(handle, dest, [0, 1])
    assert all(torch.count_nonzero(layer) == 0 for layer in dest)


def test_a_corrupted_layer_over_torch_dist_fails_the_pull_by_its_checksum(sender):
    """Bytes over torch.distributed land in the cache as they come (no copy through a buffer); a failed pull
    reports its blocks, which the connector hands to vLLM to recompute (test_kv_connector.py)."""
    peer = sender(corrupt=True, **LLAMA_LIKE)
    handle = peer.offer("bad-dist", [1, 2])
    with pytest.raises(TransferIntegrityError, match="layer 0: checksum mismatch"):
        channel_for("torch_dist").pull(handle, empty_like(handle), [0, 1])
    assert peer.status("bad-dist")[0] == "OFFERED"  # not released: a retry or the lease frees it


def test_the_gpu_checksum_is_the_same_for_the_same_blocks_however_they_are_split_into_runs_and_slices(monkeypatch):
    layer = torch.randn(8, 2, 16, 64, dtype=torch.bfloat16)
    whole = word_sum([layer])
    assert torch.equal(word_sum([layer[:3], layer[3:7], layer[7:]]), whole)
    assert torch.equal(word_sum([token_major(layer)]), whole)  # bytes in logical order, as sent
    monkeypatch.setattr(dist_channel, "_WORDS_AT_ONCE", 1000)  # a layer in many slices, as a large one is
    assert torch.equal(word_sum([layer]), whole)


def test_the_gpu_checksum_reads_the_same_bytes_alike_wherever_they_lie_in_memory():
    buffer = torch.arange(64, dtype=torch.uint8)
    assert torch.equal(word_sum([buffer[1:9]]), word_sum([buffer[1:9].clone()]))


def test_the_gpu_checksum_changes_with_any_one_word_and_with_two_words_swapped():
    layer = torch.randn(4, 2, 16, 64)
    words = layer.view(-1).view(torch.int32)
    for index, delta in ((0, 1), (777, 1 << 31), (words.numel() - 1, -5)):
        changed = layer.clone()
        changed.view(-1).view(torch.int32)[index] += delta
        assert not torch.equal(word_sum([changed]), word_sum([layer])), (index, delta)
    swapped = layer.clone()
    swapped_words = swapped.view(-1).view(torch.int32)
    swapped_words[[10, 20]] = swapped_words[[20, 10]]
    assert not torch.equal(word_sum([swapped]), word_sum([layer]))
    odd = torch.arange(7, dtype=torch.uint8)  # not a whole number of words: summed byte by byte
    assert not torch.equal(word_sum([odd]), word_sum([odd.flip(0)]))


@needs_cuda
def test_the_gpu_checksum_is_computed_on_the_gpu_and_agrees_with_the_host():
    layer = torch.randn(8, 2, 16, 64, dtype=torch.bfloat16)
    on_gpu = word_sum([layer.cuda()])
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), word_sum([layer]))
    assert torch.equal(dist_channel._checksum([layer.cuda()]), on_gpu)  # what an NCCL pull checks, at both ends


def test_a_wrong_or_missing_token_is_denied_before_any_byte_moves(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("secret", [1, 2])
    dest = empty_like(handle)
    with pytest.raises(TransferDenied, match="PERMISSION_DENIED"):
        GrpcKVChannel("not-the-secret").pull(handle, dest, [0, 1])
    stub = pb_grpc.KVTransferStub(grpc.insecure_channel(handle.address()))
    with pytest.raises(grpc.RpcError) as info:
        stub.Release(pb.TransferRef(wire_version=WIRE_VERSION, transfer_id="secret"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert all(torch.count_nonzero(layer) == 0 for layer in dest)
    assert peer.status("secret") == ("OFFERED", 0)


def test_a_proof_for_one_transfer_opens_no_other():
    assert auth.verify(SECRET, "a", auth.proof(SECRET, "a"))
    assert not auth.verify(SECRET, "b", auth.proof(SECRET, "a"))
    assert not auth.verify(SECRET, "a", None)


def test_an_expired_lease_frees_the_blocks_and_refuses_the_pull(sender):
    peer = sender(lease_s=0.3, **LLAMA_LIKE)
    handle = peer.offer("late", [1])
    assert peer.wait_freed("late", 5) == "EXPIRED"
    with pytest.raises(TransferNotFound, match="already expired"):
        GrpcKVChannel(SECRET).pull(handle, empty_like(handle), [0])


def test_release_twice_answers_done_and_frees_once(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("twice", [1])
    channel = GrpcKVChannel(SECRET)
    assert channel.release(handle).state == TransferState.DONE
    assert channel.release(handle).state == TransferState.DONE
    peer.wait_freed("twice")
    time.sleep(0.2)
    assert peer.status("twice")[0] == "DONE"
    assert [t for t, _ in peer.freed].count("twice") == 1


def test_pulling_an_unknown_or_released_transfer_is_not_found(sender):
    peer = sender(stall_s=0.5, **LLAMA_LIKE)  # an unknown id is awaited this long: its offer may be on the way
    handle = peer.offer("gone", [1])
    channel = GrpcKVChannel(SECRET)
    channel.release(handle)
    with pytest.raises(TransferNotFound, match="already done"):
        channel.pull(handle, empty_like(handle), [0])
    ghost = dataclasses.replace(handle, transfer_id="never-offered")
    with pytest.raises(TransferNotFound, match="unknown transfer"):
        channel.pull(ghost, empty_like(ghost), [0])


def test_a_handle_or_request_of_another_wire_version_is_refused(sender):
    fingerprint = KVFingerprint("m", dtype="float32", num_layers=4, num_kv_heads=8, head_shape=(16, 64))
    newer = TransferHandle("v9", (b"x" * 16,), 16, fingerprint, (SenderRank("127.0.0.1:1", 0, 8),), wire_version=9)
    with pytest.raises(TransferVersionError, match=f"wire version 9; this peer speaks {WIRE_VERSION}"):
        TransferHandle.from_bytes(newer.to_bytes())
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("v", [1])
    stub = pb_grpc.KVTransferStub(grpc.insecure_channel(handle.address()))
    metadata = [(auth.METADATA_KEY, auth.proof(SECRET, "v"))]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(pb.PullRequest(wire_version=9, transfer_id="v"), timeout=5, metadata=metadata))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_stalled_sender_times_out_and_a_retry_works_while_the_lease_holds(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("retry", [1, 2], layers_ready=2)
    channel = GrpcKVChannel(SECRET)
    started = time.monotonic()
    with pytest.raises(TransferTimeout, match="no progress for 0.5 s"):
        channel.pull(handle, empty_like(handle), [0, 1], stall_timeout_s=0.5)
    assert time.monotonic() - started < 2
    peer.mark_layer_ready("retry", 3)
    dest = empty_like(handle)
    channel.pull(handle, dest, [0, 1])
    assert same_bytes(dest[3], peer.layers()[3][[1, 2]])


def test_a_receiver_with_another_layout_is_refused(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("layout", [1])
    wrong = [torch.zeros((1, 8, 16, 256), dtype=torch.float16) for _ in range(4)]
    with pytest.raises(TransferLayoutError, match=r"sender \(dtype, head block\)"):
        GrpcKVChannel(SECRET).pull(handle, wrong, [0])


CHUNKS = [[20, 3, 4], [5, 9, 10], [11, 1]]  # a prompt of eight blocks, computed three chunks apart


def run_chunks(peer, transfer_id: str, chunks: list[list[int]], layers: int, between=lambda chunk: None) -> float:
    """Compute a chunked prompt on ``peer``: each chunk's blocks offered, then its layers saved one by one;
    ``between(chunk)`` after each. Returns the wall clock when the last layer of the last chunk was saved."""
    whole = 0
    for number, chunk in enumerate(chunks):
        whole += len(chunk)
        if number:
            peer.extend(transfer_id, chunk, whole)
        for layer in range(layers):
            peer.mark_layer_ready(transfer_id, layer)
        computed_at = time.time()
        between(number)
    return computed_at


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prompt_computed_chunk_by_chunk_is_pulled_chunk_by_chunk_while_it_runs(sender, backend):
    peer = sender(**LLAMA_LIKE)
    source_ids = [block for chunk in CHUNKS for block in chunk]
    handle = peer.offer("chunked", CHUNKS[0], layers_ready=0, num_blocks=len(source_ids), segment=len(CHUNKS[0]))
    dest, dest_ids = empty_like(handle, blocks=10), [9, 8, 7, 0, 1, 2, 3, 5]
    source, result = peer.layers(), {}
    puller = threading.Thread(
        target=lambda: result.setdefault("r", channel_for(backend).pull(handle, dest, dest_ids, stall_timeout_s=5))
    )
    puller.start()

    def landed(blocks: int) -> bool:
        return all(same_bytes(dest[lay][dest_ids[:blocks]], source[lay][source_ids[:blocks]]) for lay in range(4))

    def chunk_lands_before_the_next_is_computed(number: int) -> None:
        if number < len(CHUNKS) - 1:
            wait_for(lambda: landed(sum(map(len, CHUNKS[: number + 1]))), timeout_s=5)
            assert puller.is_alive()  # the pull goes on, waiting for the next chunk

    computed_at = run_chunks(peer, "chunked", CHUNKS, 4, chunk_lands_before_the_next_is_computed)
    puller.join(10)
    assert landed(len(source_ids))
    assert result["r"].first_bytes_at < computed_at  # pulling began before the prefill ended
    assert result["r"].bytes == sum(t[source_ids].numel() * t.element_size() for t in source)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chunk_that_never_comes_fails_the_pull_at_the_stall_deadline(sender, backend):
    peer = sender(stall_s=1.0, **LLAMA_LIKE)
    handle = peer.offer("stuck", CHUNKS[0], num_blocks=8, segment=3)  # the first chunk whole, no second one
    started = time.monotonic()
    with pytest.raises(TransferTimeout):
        channel_for(backend).pull(handle, empty_like(handle), list(range(8)), stall_timeout_s=2)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pull_ends_at_its_overall_deadline_while_the_chunks_still_come(sender, backend):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("slowly", CHUNKS[0], num_blocks=8, segment=3)  # the rest of the prompt never comes
    started = time.monotonic()
    with pytest.raises(TransferTimeout):
        channel_for(backend).pull(handle, empty_like(handle), list(range(8)), stall_timeout_s=5, timeout_s=1)
    assert time.monotonic() - started < 2.5  # the pull's deadline, not the 5 s stall deadline


def test_a_dist_receiver_that_gave_up_on_a_chunk_gets_no_push_and_its_next_pull_works(sender):
    peer = sender(stall_s=5.0, **LLAMA_LIKE)  # the sender would wait longer for the chunk than the receiver does
    handle = peer.offer("late", CHUNKS[0], num_blocks=6, segment=3)
    receiver, source = channel_for("torch_dist"), peer.layers()
    with pytest.raises(TransferTimeout):
        receiver.pull(handle, empty_like(handle), list(range(6)), stall_timeout_s=1)
    peer.extend("late", CHUNKS[1], 6)  # the chunk comes after the receiver gave up
    for layer in range(4):
        peer.mark_layer_ready("late", layer)
    dest, started = empty_like(handle), time.monotonic()
    receiver.pull(handle, dest, list(range(6)), stall_timeout_s=5)
    assert time.monotonic() - started < 3  # no push of the abandoned plan stood in the way
    assert all(same_bytes(dest[layer], source[layer][CHUNKS[0] + CHUNKS[1]]) for layer in range(4))


def test_the_local_channel_pulls_a_chunked_prompt_as_it_is_computed():
    registry = TransferRegistry("local", "m")
    try:
        layers = layer_tensors(2, 8, (2, 16, 64), "float32", 3)
        handle = registry.offer("loc", layers, [6, 1], block_hashes(3), 48, layers_ready=0, segment=1)
        dest = [torch.zeros((4, 2, 16, 64)) for _ in range(2)]
        with ThreadPoolExecutor(1) as pool:
            pulled = pool.submit(LocalKVChannel(registry).pull, handle, dest, [3, 0, 2], stall_timeout_s=5)
            for layer in range(2):
                registry.mark_layer_ready("loc", layer)
            wait_for(lambda: torch.equal(dest[1][3], layers[1][6]))
            assert not pulled.done()
            registry.extend("loc", [4], segment_end=3)
            for layer in range(2):
                registry.mark_layer_ready("loc", layer)
            assert pulled.result(5).blocks == 3
        assert all(torch.equal(dest[layer][[3, 0, 2]], layers[layer][[6, 1, 4]]) for layer in range(2))
    finally:
        registry.close()


def test_the_local_channel_copies_in_process_with_the_same_contract():
    freed = []
    registry = TransferRegistry("local", "m", on_freed=lambda tid, state: freed.append((tid, state)))
    try:
        layers = layer_tensors(2, 8, (2, 16, 64), "bfloat16", 3)
        handle = registry.offer("loc", layers, [6, 1], block_hashes(2), 32, backends=("local",))
        dest = [torch.zeros((4, 2, 16, 64), dtype=torch.bfloat16) for _ in range(2)]
        channel = LocalKVChannel(registry)
        channel.pull(handle, dest, [3, 0])
        assert torch.equal(dest[1][[3, 0]], layers[1][[6, 1]])
        channel.release(handle)
        assert freed == [("loc", TransferState.DONE)]
    finally:
        registry.close()


def test_a_failed_dist_group_is_rebuilt_on_next_use(sender):
    peer = sender(stall_s=1.0, **LLAMA_LIKE)
    receiver = channel_for("torch_dist")
    stalled = peer.offer("stall", [1], layers_ready=1)
    with pytest.raises(TransferTimeout):
        receiver.pull(stalled, empty_like(stalled), [0], stall_timeout_s=1.0)
    handle = peer.offer("next", [2, 3])
    dest = empty_like(handle)
    receiver.pull(handle, dest, [0, 1], stall_timeout_s=5)
    assert same_bytes(dest[3], peer.layers()[3][[2, 3]])


def test_a_sender_whose_store_never_answers_fails_the_dist_pull_at_its_deadline(sender):
    """Joining the sender's TCPStore waits for its answer with no deadline of its own (torch 2.13); the pull's
    holds. Before, the pull waited for good."""
    peer = sender(silent_store=True, **LLAMA_LIKE)
    handle, failures = peer.offer("silent", [1, 2]), []

    def pull() -> None:
        try:
            channel_for("torch_dist").pull(handle, empty_like(handle), [0, 1], stall_timeout_s=1, timeout_s=2)
        except TransferError as exc:
            failures.append(exc)

    started = time.monotonic()
    puller = threading.Thread(target=pull, daemon=True)
    puller.start()
    puller.join(10)
    assert not puller.is_alive(), "the pull hung on the sender's store"
    assert [type(exc) for exc in failures] == [TransferTimeout]
    assert time.monotonic() - started < 2 + 1.5  # the pull's deadline (2 s)


def test_a_dist_pull_waiting_on_the_senders_layers_says_its_time_went_to_receiving(sender):
    peer = sender(**LLAMA_LIKE)
    handle = peer.offer("late-layers", [1, 2], layers_ready=1)  # layers 1-3 still being computed

    def compute_the_rest() -> None:
        for layer in (1, 2, 3):
            peer.mark_layer_ready("late-layers", layer)

    later = threading.Timer(1.0, compute_the_rest)
    later.start()
    try:
        result = channel_for("torch_dist").pull(handle, empty_like(handle), [0, 1], stall_timeout_s=5)
    finally:
        later.join()
    assert set(result.phases) == set(PHASES)
    assert result.phases["receive"] >= 0.9 and sum(result.phases.values()) <= result.seconds
    assert max(result.phases, key=result.phases.get) == "receive"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL needs two GPUs for two ranks (it cannot put both on one GPU); none here",
)
def test_nccl_round_trip_between_two_gpus(sender):
    peer = sender(**LLAMA_LIKE)  # its blocks move to cuda:0 for the send
    handle = peer.offer("nccl", [1, 2, 3])
    torch.cuda.set_device(1)
    dest = [layer.cuda(1) for layer in empty_like(handle)]
    channel_for("torch_dist").pull(handle, dest, [0, 1, 2])
    source = peer.layers()
    assert all(same_bytes(dest[layer].cpu(), source[layer][[1, 2, 3]]) for layer in range(4))


LAYOUTS = pytest.mark.parametrize("token_major_caches", [False, True], ids=["head-major", "token-major"])


@needs_cuda
@LAYOUTS
@pytest.mark.parametrize("sender_device, dest_device", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("dest_ids", [[4, 5, 6], [9, 2, 7]], ids=["adjacent", "scattered"])
def test_grpc_moves_blocks_between_cuda_and_host_caches(
    sender, sender_device, dest_device, dest_ids, token_major_caches
):
    peer = sender(device=sender_device, dtype="bfloat16", token_major=token_major_caches, **LLAMA_LIKE)
    handle = peer.offer("gpu", [1, 2, 3])
    dest = [layer.to(dest_device) for layer in empty_like(handle, blocks=12)]
    dest = [token_major(layer) for layer in dest] if token_major_caches else dest
    channel_for("grpc").pull(handle, dest, dest_ids)
    source = peer.layers()
    assert all(same_bytes(dest[layer][dest_ids].cpu(), source[layer][[1, 2, 3]]) for layer in range(4))


@needs_cuda
@LAYOUTS
def test_dist_pull_from_a_cuda_cache_into_host_memory_goes_over_gloo(sender, token_major_caches):
    peer = sender(device="cuda", dtype="float16", token_major=token_major_caches, **LLAMA_LIKE)
    handle = peer.offer("gpu-dist", [7, 0, 1])
    dest = empty_like(handle, blocks=8)
    dest = [token_major(layer) for layer in dest] if token_major_caches else dest
    channel_for("torch_dist").pull(handle, dest, [3, 4, 5])
    source = peer.layers()
    assert all(same_bytes(dest[layer][[3, 4, 5]], source[layer][[7, 0, 1]]) for layer in range(4))


@needs_cuda
def test_local_channel_copies_between_cuda_caches():
    registry = TransferRegistry("local", "m")
    try:
        layers = [layer.cuda() for layer in layer_tensors(2, 8, (2, 16, 64), "float16", 5)]
        handle = registry.offer("gpu-local", layers, [6, 1], block_hashes(2), 32, backends=("local",))
        dest = [torch.zeros((4, 2, 16, 64), dtype=torch.float16, device="cuda") for _ in range(2)]
        LocalKVChannel(registry).pull(handle, dest, [3, 0])
        assert all(torch.equal(dest[layer][[3, 0]], layers[layer][[6, 1]]) for layer in range(2))
    finally:
        registry.close()


def test_grpc_transfers_can_run_over_tls(tmp_path):
    from pdserve.local_tls import make_certificates

    make_certificates(tmp_path)
    key, certificate = (tmp_path / "server.key").read_bytes(), (tmp_path / "server.crt").read_bytes()
    registry = TransferRegistry("", "m")
    server = KVTransferServer(registry, SECRET, tls=(key, certificate)).start()
    try:
        layers = layer_tensors(2, 4, (2, 16, 64), "float32", 5)
        handle = registry.offer("tls", layers, [3, 2], block_hashes(2), 32)
        dest = [torch.zeros((2, 2, 16, 64)) for _ in range(2)]
        GrpcKVChannel(SECRET, tls_root_certificate=(tmp_path / "ca.crt").read_bytes()).pull(handle, dest, [0, 1])
        assert torch.equal(dest[1], layers[1][[3, 2]])
        with pytest.raises(TransferUnavailable):  # a plaintext client cannot talk to the TLS server
            GrpcKVChannel(SECRET).pull(handle, dest, [0, 1], stall_timeout_s=2, timeout_s=3)
    finally:
        server.stop()
        registry.close()


def test_a_receiver_whose_kv_fingerprint_differs_is_refused_naming_both():
    sender = KVFingerprint("m", "w1", "bfloat16", 4, 8, (16, 64), "LBHNC", 1)
    sender.check_compatible("t", dataclasses.replace(sender))
    for field, value in [("cache_layout", "NHD"), ("dtype", "float32"), ("weights", "w2"), ("head_shape", (32, 64)),
                         ("model_id", "other"), ("hash_scheme", 2), ("num_kv_heads", 4)]:  # fmt: skip
        receiver = dataclasses.replace(sender, **{field: value})
        with pytest.raises(TransferLayoutError, match=f"incompatible KV: sender .* vs receiver .*{field}: "):
            sender.check_compatible("t", receiver)


def test_a_numpy_cache_moves_over_grpc_byte_for_byte_into_adjacent_and_scattered_blocks():
    """The simulated engine's stand-in cache (numpy, no torch in its workers) takes the same gRPC path."""
    import numpy as np

    registry = TransferRegistry("", "m")
    server = KVTransferServer(registry, SECRET, torch_dist=False).start()
    try:
        layers = [np.random.default_rng(layer).integers(0, 256, (12, 1, 16, 1), dtype=np.uint8) for layer in range(2)]
        handle = registry.offer("sim", layers, [4, 5, 6, 9], block_hashes(4), 64)
        for dest_ids in ([0, 1, 2, 3], [7, 2, 10, 5]):  # one strided copy; an indexed one
            dest = [np.zeros((12, 1, 16, 1), dtype=np.uint8) for _ in range(2)]
            result = GrpcKVChannel(SECRET, max_chunk_bytes=24).pull(handle, dest, dest_ids)
            assert result.bytes == 2 * 4 * 16
            for layer in range(2):
                assert np.array_equal(dest[layer][dest_ids], layers[layer][[4, 5, 6, 9]])
                untouched = [i for i in range(12) if i not in dest_ids]
                assert not dest[layer][untouched].any()
    finally:
        server.stop()
        registry.close()


def test_a_sender_that_offers_no_torch_dist_refuses_its_pull_plans():
    registry = TransferRegistry("", "m")
    server = KVTransferServer(registry, SECRET, torch_dist=False).start()
    try:
        layers = layer_tensors(1, 4, (2, 16, 64), "float32", 5)
        handle = registry.offer("grpc-only", layers, [0, 1], block_hashes(2), 32)
        dest = [torch.zeros((2, 2, 16, 64))]
        with pytest.raises(TransferError, match="does not offer torch_dist"):
            DistKVChannel(GrpcKVChannel(SECRET)).pull(handle, dest, [0, 1], stall_timeout_s=2, timeout_s=3)
        assert registry.status("grpc-only").state == TransferState.OFFERED  # nothing was read; the offer stands
    finally:
        server.stop()
        registry.close()
