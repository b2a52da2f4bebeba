"""Transfer benchmark: pdserve's KV channels against raw transports, between two processes.

Payload: the KV of 2,048 tokens in Llama-3-8B's layout (32 layers x K,V x 8 KV
heads x 128 x fp16 = 256 MiB, laid out as vLLM CPU blocks of 16 tokens), and
one 16-token block (2 MiB). A sender process holds the blocks; this process
pulls them. In the same run, the raw baselines move the same bytes between the
same two processes: one contiguous Gloo send/recv, a bare gRPC byte stream with
the same chunk size (no protobuf, no checks), and an in-process memcpy.

Rank to rank: the same 256 MiB from a two-rank sender (two processes, four KV
heads each), pulled side by side into one receiver as the connector does,
against one sender holding all eight (``tp2_to_tp1_vs_tp1_to_tp1``, goodput).

Hand-off cost, through vLLM on the engine-benchmark model: a prefill engine
and a decode engine in two processes, a 2,048-token prompt; the time from the
end of the prefill to the decode side's first token, divided by the prefill
time. Two ways, in the same run:

- up front (what the service does for a prompt that starts at once): the decode
  side gets the handle before the prompt runs and pulls each layer as the
  prefill saves it, so most of the pull overlaps the prefill;
- after the prefill (what it does for a prompt queued behind a step's worth of
  others): the decode side gets the handle when the prefill is done and pulls
  everything then.

For scale, the same first step with all the KV already local is reported beside them.

Chunked: the same, with an 8,192-token prompt prefilled 1,024 tokens per step
(``chunked_handoff_vs_prefill``): up front, the decode side pulls each chunk's
blocks while the later chunks run.

On a GPU (``device="cuda"``), also the path a GPU cluster takes over gRPC: the
same 256 MiB from a sender whose cache is on the GPU to a receiver whose cache
is on the GPU, both in vLLM's GPU layout (tokens before heads in memory, so the
per-layer view the connector gets is not contiguous and every layer goes
through staging at both ends), against the host-to-host pull of the same run
and against the bare copies the two device ends add (GPU to pinned host memory
and back). torch.distributed into a GPU cache is NCCL, which needs a GPU per
rank: not measured on one GPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
import uuid
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
import torch
import torch.distributed as dist

from bench.engine_process import ChildProcess
from bench.report import Row, report
from kv_transfer.channel import GrpcKVChannel
from kv_transfer.dist_channel import DistKVChannel
from kv_transfer.transfer import DEFAULT_CHUNK_BYTES, SenderRank, TransferHandle, head_pulls

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, TOKENS = 32, 8, 128, 16, 2048
CHUNKED_TOKENS, CHUNK_TOKENS = 8192, 1024  # the chunked hand-off: prompt, and tokens per prefill step
BLOCKS = TOKENS // BLOCK_TOKENS
SECRET = "bench-secret"
_RAW_METHOD = "/pdserve.bench.Raw/Stream"


def _gpu_layout(layer: torch.Tensor) -> torch.Tensor:
    """``layer`` on the GPU with tokens before heads in memory (vLLM's GPU cache layout, LBNHC), seen through
    the logical [blocks, heads, tokens, content] view vLLM hands the connector."""
    return layer.cuda().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


def _sender_main(conn, heads: tuple[int, int] | None, device: str) -> None:
    from kv_transfer.grpc_service import KVTransferServer
    from kv_transfer.transfer import TransferRegistry

    layers = [torch.randn(BLOCKS + 1, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM).half() for _ in range(LAYERS)]
    if heads is not None:  # one tensor-parallel rank's share of the KV heads
        layers = [layer[:, heads[0] : heads[0] + heads[1]].contiguous() for layer in layers]
    payload = torch.cat([layer[:BLOCKS].reshape(-1) for layer in layers]).view(torch.uint8).numpy()
    if device == "cuda":
        layers = [_gpu_layout(layer) for layer in layers]
    registry = TransferRegistry("", "bench", lease_s=300)
    server = KVTransferServer(registry, SECRET).start()
    raw = _raw_grpc_server(memoryview(payload))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    conn.send(("ready", server.address, raw[1], store.port))
    groups = {}
    while conn.poll(600):
        command, *args = conn.recv()
        if command == "offer":
            transfer_id, block_ids = args
            hashes = [i.to_bytes(16, "big") for i in range(len(block_ids))]
            handle = registry.offer(transfer_id, layers, block_ids, hashes, BLOCK_TOKENS * len(block_ids))
            conn.send(("handle", handle.to_bytes()))
        elif command == "gloo_send":
            key = args[0]
            group = groups.get(key) or dist.ProcessGroupGloo(dist.PrefixStore(key, store), 0, 2, timedelta(seconds=60))
            groups[key] = group
            group.send([torch.from_numpy(payload)], 1, 0).wait(timedelta(seconds=60))
        elif command == "stop":
            break
    raw[0].stop(0)
    server.stop()
    registry.close()


def _raw_grpc_server(payload: memoryview):
    def stream(request: bytes, context):
        chunk = int.from_bytes(request, "big")
        for offset in range(0, len(payload), chunk):
            yield bytes(payload[offset : offset + chunk])

    handler = grpc.method_handlers_generic_handler(
        "pdserve.bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class _Sender(ChildProcess):
    def __init__(self, heads: tuple[int, int] | None = None, device: str = "cpu"):
        super().__init__(_sender_main, heads, device)
        _, self.address, self.raw_address, self.store_port = self._conn.recv()

    def offer(self, block_ids: list[int], transfer_id: str = "") -> TransferHandle:
        self._conn.send(("offer", transfer_id or uuid.uuid4().hex, block_ids))
        return TransferHandle.from_bytes(self._conn.recv()[1])

    def gloo_send(self, key: str) -> None:
        self._conn.send(("gloo_send", key))


def run_transfer_bench(
    repeats: int = 5, block_pulls: int = 50, handoff_model: Path | None = None, json_path=None, device: str = "cpu"
):
    sender = _Sender()
    try:
        results = _channel_figures(sender, repeats, block_pulls)
        results.update(_tensor_parallel_figures(sender, repeats))
        if device == "cuda":
            results.update(_cuda_figures(sender, repeats, block_pulls))
    finally:
        sender.stop()
    if handoff_model is not None:
        results.update(_handoff_figures(handoff_model, repeats))
        with tempfile.TemporaryDirectory() as work_dir:
            results.update(_chunked_handoff_figures(repeats, Path(work_dir)))
    report(_rows(results), results, json_path)
    return results


def _channel_figures(sender: _Sender, repeats: int, block_pulls: int) -> dict:
    total = LAYERS * BLOCKS * KV_HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * 2
    dest = [torch.empty(BLOCKS, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    grpc_channel = GrpcKVChannel(SECRET, max_chunk_bytes=DEFAULT_CHUNK_BYTES)
    channels = {"grpc": grpc_channel, "dist": DistKVChannel(grpc_channel)}
    seconds = {name: [] for name in ("grpc", "dist", "raw_grpc", "raw_gloo", "memcpy")}
    raw_buffer = torch.empty(total, dtype=torch.uint8)
    gloo_key = uuid.uuid4().hex
    store = dist.TCPStore("127.0.0.1", sender.store_port, is_master=False, timeout=timedelta(seconds=60))
    gloo = None
    for _ in range(repeats + 1):  # the first round warms connections and groups up, untimed
        for name, channel in channels.items():
            handle = sender.offer(list(range(BLOCKS)))
            start = time.perf_counter()
            channel.pull(handle, dest, list(range(BLOCKS)), stall_timeout_s=60, timeout_s=600)
            seconds[name].append(time.perf_counter() - start)
            channel.release(handle)
        seconds["raw_grpc"].append(_raw_grpc_pull(sender.raw_address, raw_buffer))
        sender.gloo_send(gloo_key)
        if gloo is None:
            gloo = dist.ProcessGroupGloo(dist.PrefixStore(gloo_key, store), 1, 2, timedelta(seconds=60))
        start = time.perf_counter()
        gloo.recv([raw_buffer], 0, 0).wait(timedelta(seconds=60))
        seconds["raw_gloo"].append(time.perf_counter() - start)
        source = torch.empty_like(raw_buffer)
        start = time.perf_counter()
        raw_buffer.copy_(source)
        seconds["memcpy"].append(time.perf_counter() - start)
    median = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    gbps = {name: total / s / 1e9 for name, s in median.items()}
    block_ms = {name: _block_pull_p50_ms(sender, channel, block_pulls) for name, channel in channels.items()}
    return {
        "dist_vs_raw": gbps["dist"] / gbps["raw_gloo"],
        "grpc_vs_raw": gbps["grpc"] / gbps["raw_grpc"],
        "block_pull_p50_ms": min(block_ms.values()),
        "block_pull_p50_ms_grpc": block_ms["grpc"],
        "block_pull_p50_ms_dist": block_ms["dist"],
        **{f"{name}_gb_per_s": value for name, value in gbps.items()},
        **{f"{name}_ms": 1000 * value for name, value in median.items()},
        "payload_bytes": total,
        "chunk_bytes": DEFAULT_CHUNK_BYTES,
        "repeats": repeats,
    }


def _cuda_figures(host_sender: _Sender, repeats: int, block_pulls: int) -> dict:
    """gRPC from a GPU cache to a GPU cache (both in vLLM's GPU layout) against host to host, in turn."""
    total = LAYERS * BLOCKS * KV_HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * 2
    sender = _Sender(device="cuda")
    try:
        shape = (BLOCKS, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)
        dest = {
            "cpu": [torch.empty(shape, dtype=torch.float16) for _ in range(LAYERS)],
            "cuda": [_gpu_layout(torch.empty(shape, dtype=torch.float16)) for _ in range(LAYERS)],
        }
        channel = GrpcKVChannel(SECRET)
        ids = list(range(BLOCKS))
        seconds: dict[str, list[float]] = {"host_to_host": [], "cuda_to_cuda": [], "cuda_copy": []}
        pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        on_gpu = torch.empty(total, dtype=torch.uint8, device="cuda")
        for _ in range(repeats + 1):  # the first round warms connections and the pinned staging up, untimed
            for name, source, device in (("host_to_host", host_sender, "cpu"), ("cuda_to_cuda", sender, "cuda")):
                handle = source.offer(ids)
                start = time.perf_counter()
                channel.pull(handle, dest[device], ids, stall_timeout_s=60, timeout_s=600)
                torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
                channel.release(handle)
            start = time.perf_counter()
            pinned.copy_(on_gpu)
            on_gpu.copy_(pinned)
            torch.cuda.synchronize()
            seconds["cuda_copy"].append(time.perf_counter() - start)
        block_ms = _block_pull_p50_ms(sender, channel, block_pulls, device="cuda")
    finally:
        sender.stop()
    del dest, pinned, on_gpu
    torch.cuda.empty_cache()  # the GPU memory back before the hand-off's engines start
    median = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    return {
        "cuda_grpc_vs_host_grpc": median["host_to_host"] / median["cuda_to_cuda"],
        "cuda_grpc_gb_per_s": total / median["cuda_to_cuda"] / 1e9,
        "cuda_grpc_ms": 1000 * median["cuda_to_cuda"],
        "cuda_copy_ms": 1000 * median["cuda_copy"],  # the bytes to pinned host memory and back, bare
        "cuda_block_pull_p50_ms_grpc": block_ms,
        "cuda_device": torch.cuda.get_device_name(),
    }


def _tensor_parallel_figures(sender: _Sender, repeats: int) -> dict:
    """The 2,048-token hand-off from a two-rank prefill engine (two sender processes, 4 KV heads each) to a
    one-rank decode engine, which pulls both halves side by side (as the connector does), against the same
    bytes from a one-rank sender; over the default channel (torch.distributed)."""
    halves = [_Sender((0, KV_HEADS // 2)), _Sender((KV_HEADS // 2, KV_HEADS // 2))]
    try:
        dest = [torch.empty(BLOCKS, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
        channel = DistKVChannel(GrpcKVChannel(SECRET))
        ids = list(range(BLOCKS))
        seconds: dict[str, list[float]] = {"tp1_to_tp1": [], "tp2_to_tp1": []}
        with futures.ThreadPoolExecutor(2) as pool:
            for _ in range(repeats + 1):  # the first round builds the groups, untimed
                handle = sender.offer(ids)
                start = time.perf_counter()
                channel.pull(handle, dest, ids, stall_timeout_s=60, timeout_s=600)
                seconds["tp1_to_tp1"].append(time.perf_counter() - start)
                channel.release(handle)
                transfer_id = uuid.uuid4().hex  # one transfer, offered by both ranks
                handle = _two_rank_handle([half.offer(ids, transfer_id) for half in halves])
                start = time.perf_counter()
                pulls = [
                    pool.submit(channel.pull, handle, dest, ids, stall_timeout_s=60, timeout_s=600, rank=r, heads=h)
                    for r, h in head_pulls(handle.ranks, range(KV_HEADS))
                ]
                for pull in pulls:
                    pull.result()
                seconds["tp2_to_tp1"].append(time.perf_counter() - start)
                for rank in range(2):
                    channel.release(handle, rank=rank)
    finally:
        for half in halves:
            half.stop()
    median = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    return {
        "tp2_to_tp1_vs_tp1_to_tp1": median["tp1_to_tp1"] / median["tp2_to_tp1"],  # goodput: same bytes
        "tp1_to_tp1_ms": 1000 * median["tp1_to_tp1"],
        "tp2_to_tp1_ms": 1000 * median["tp2_to_tp1"],
    }


def _two_rank_handle(handles: list[TransferHandle]) -> TransferHandle:
    """One engine's handle for two senders, each holding half of the KV heads."""
    ranks = tuple(SenderRank(h.address(), rank * (KV_HEADS // 2), KV_HEADS // 2) for rank, h in enumerate(handles))
    fingerprint = dataclasses.replace(handles[0].fingerprint, num_kv_heads=KV_HEADS)
    return dataclasses.replace(handles[0], ranks=ranks, fingerprint=fingerprint)


def _raw_grpc_pull(address: str, buffer: torch.Tensor) -> float:
    target = buffer.numpy()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stream = channel.unary_stream(_RAW_METHOD)
        start = time.perf_counter()
        offset = 0
        for chunk in stream(DEFAULT_CHUNK_BYTES.to_bytes(8, "big"), timeout=600):
            target[offset : offset + len(chunk)] = memoryview(chunk)
            offset += len(chunk)
        return time.perf_counter() - start


def _block_pull_p50_ms(sender: _Sender, channel, pulls: int, device: str = "cpu") -> float:
    dest = [torch.empty(1, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM, dtype=torch.float16) for _ in range(LAYERS)]
    if device == "cuda":
        dest = [_gpu_layout(layer) for layer in dest]
    times = []
    for i in range(pulls + 1):
        handle = sender.offer([i % BLOCKS])
        start = time.perf_counter()
        channel.pull(handle, dest, [0], stall_timeout_s=30)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        channel.release(handle)
    return 1000 * statistics.median(times[1:])


def _handoff(model: Path, repeats: int, tokens: int = TOKENS, step_tokens: int | None = None) -> dict[str, list]:
    """Rounds of a ``tokens``-token prompt, prefilled with ``step_tokens`` per step (default: all in one step),
    handed to the decode engine: seconds per round of the prefill, of the hand-off with the handle up front and
    after the prefill, and of the same first step with all KV local."""
    import random

    from bench.engine_process import EnginePeer
    from engine.block_hash import hash_chain
    from engine.config import EngineConfig, KVConnectorSpec

    def config(role: str) -> EngineConfig:
        spec = KVConnectorSpec(module_path="kv_transfer.vllm_connector", class_name="PdserveConnector", role=role)
        budget = step_tokens or tokens + 256
        return EngineConfig(model=model, max_model_len=tokens + 256, max_num_batched_tokens=budget, kv_connector=spec)

    env = {"PDSERVE_CLUSTER_TOKEN": SECRET}
    producer = config("kv_producer")
    prefill, decode = EnginePeer(producer, env), EnginePeer(config("kv_consumer"), env)
    figures: dict[str, list[float]] = {"prefill": [], "upfront": [], "after": [], "local": []}
    try:
        rng = random.Random(0)
        for i in range(repeats + 1):  # the first round warms both engines up
            for path in ("upfront", "after"):
                ids = [rng.randrange(2, prefill.vocab_size) for _ in range(tokens)]
                hashes = [h.hex() for h in hash_chain(producer.served_model_id, ids, producer.block_size)]
                transfer_id = f"{path}{i}-{uuid.uuid4().hex[:6]}"
                produce = {"pdserve": "produce", "transfer_id": transfer_id, "block_hashes": hashes}
                start = time.perf_counter()
                if path == "upfront":
                    handle = prefill.kv_handle(transfer_id, hashes, len(ids))
                    decode.submit(f"d{path}{i}", ids, 1, {"pdserve": "consume", "handle": handle})
                    with futures.ThreadPoolExecutor(1) as pool:  # both ends' answers timed as they arrive
                        decoded = pool.submit(lambda: (decode.result(), time.perf_counter())[1])
                        prefill.generate(f"p{path}{i}", ids, 1, produce)
                        prefilled = time.perf_counter()
                        first_token = decoded.result()
                else:
                    _, out, _, _ = prefill.generate(f"p{path}{i}", ids, 1, produce)
                    prefilled = time.perf_counter()
                    decode.generate(f"d{path}{i}", ids, 1, {"pdserve": "consume", "handle": out["pdserve_handle"]})
                    first_token = time.perf_counter()
                if i > 0:  # negative: the decode side's first token came before the prefill side said it was done
                    figures[path].append(first_token - prefilled)
                    figures["prefill"].append(prefilled - start)
            start = time.perf_counter()  # the last prompt again, now all local: the first step alone
            decode.generate(f"l{i}", ids, 1)
            if i > 0:
                figures["local"].append(time.perf_counter() - start)
    finally:
        prefill.stop()
        decode.stop()
    return figures


def _handoff_figures(model: Path, repeats: int) -> dict:
    """A 2,048-token prompt computed in one step: the hand-off overlaps the prefill layer by layer."""
    return _handoff_summary(_handoff(model, repeats), "")


def _chunked_handoff_figures(repeats: int, work_dir: Path) -> dict:
    """An 8,192-token prompt prefilled in chunks of 1,024: the hand-off overlaps the prefill chunk by chunk.

    On the engine-benchmark model's shape with 8k positions (the bench model has 4k), made in ``work_dir``.
    """
    from engine.tiny_model import BENCH_SHAPE, make_model

    shape = dataclasses.replace(BENCH_SHAPE, max_position_embeddings=CHUNKED_TOKENS + 256)
    model = make_model(work_dir / "bench-8k", shape)
    return _handoff_summary(_handoff(model, repeats, CHUNKED_TOKENS, CHUNK_TOKENS), "chunked_")


def _handoff_summary(figures: dict[str, list[float]], prefix: str) -> dict:
    """Medians of ``_handoff``'s rounds, each hand-off over the prefill time, under names starting ``prefix``."""
    median = {name: statistics.median(values) for name, values in figures.items()}
    named = {
        "handoff_vs_prefill": median["upfront"] / median["prefill"],
        "handoff_after_prefill_vs_prefill": median["after"] / median["prefill"],
        "handoff_ms": 1000 * median["upfront"],
        "handoff_after_prefill_ms": 1000 * median["after"],
        "prefill_ms": 1000 * median["prefill"],
        "first_step_all_local_ms": 1000 * median["local"],
        "handoff_ms_rounds": [1000 * t for t in figures["upfront"]],
    }
    return {prefix + name: value for name, value in named.items()}


def _rows(results: dict) -> list[Row]:
    rows = [
        ("dist_vs_raw", f"{results['dist_vs_raw']:.3f}", ">= 0.8"),
        ("grpc_vs_raw", f"{results['grpc_vs_raw']:.3f}", ">= 0.7"),
        ("block_pull_p50_ms", f"{results['block_pull_p50_ms']:.2f}", "<= 5"),
        ("  one block, grpc (ms)", f"{results['block_pull_p50_ms_grpc']:.2f}", ""),
        ("  one block, torch.distributed (ms)", f"{results['block_pull_p50_ms_dist']:.2f}", ""),
    ]
    for name in ("dist", "raw_gloo", "grpc", "raw_grpc", "memcpy"):
        rows.append((f"  {name} GB/s (256 MiB)", f"{results[f'{name}_gb_per_s']:.2f}", ""))
    rows += [
        ("tp2_to_tp1_vs_tp1_to_tp1", f"{results['tp2_to_tp1_vs_tp1_to_tp1']:.3f}", ">= 0.9"),
        ("  256 MiB from one rank (ms)", f"{results['tp1_to_tp1_ms']:.1f}", ""),
        ("  256 MiB from two ranks, 4 heads each (ms)", f"{results['tp2_to_tp1_ms']:.1f}", ""),
    ]
    if "cuda_grpc_vs_host_grpc" in results:
        rows += [
            ("cuda_grpc_vs_host_grpc", f"{results['cuda_grpc_vs_host_grpc']:.3f}", ""),
            (f"  GPU to GPU cache, grpc, {results['cuda_device']} (GB/s)", f"{results['cuda_grpc_gb_per_s']:.2f}", ""),
            ("  the bytes to pinned host memory and back, bare (ms)", f"{results['cuda_copy_ms']:.1f}", ""),
            ("  one block into a GPU cache, grpc (ms)", f"{results['cuda_block_pull_p50_ms_grpc']:.2f}", ""),
        ]
    if "handoff_vs_prefill" in results:
        rows += _handoff_rows(results, "", "prefill of 2,048 tokens (ms)")
        rows += _handoff_rows(results, "chunked_", "prefill of 8,192 tokens, chunks of 1,024 (ms)")
    return rows


def _handoff_rows(results: dict, prefix: str, prefill_label: str) -> list[Row]:
    figures = {name.removeprefix(prefix): value for name, value in results.items() if name.startswith(prefix)}
    return [
        (f"{prefix}handoff_vs_prefill", f"{figures['handoff_vs_prefill']:.3f}", "<= 0.1"),
        (f"  {prefill_label}", f"{figures['prefill_ms']:.1f}", ""),
        ("  hand-off, handle up front (ms)", f"{figures['handoff_ms']:.1f}", ""),
        ("  ... per round", " ".join(f"{t:.1f}" for t in figures["handoff_ms_rounds"]), ""),
        ("  hand-off, handle after the prefill (ms)", f"{figures['handoff_after_prefill_ms']:.1f}", ""),
        ("  handoff_after_prefill_vs_prefill", f"{figures['handoff_after_prefill_vs_prefill']:.3f}", ""),
        ("  same first step, all KV local (ms)", f"{figures['first_step_all_local_ms']:.1f}", ""),
    ]
