"""A real sender (or receiver) process for the KV-transfer tests, driven over a multiprocessing pipe."""

from __future__ import annotations

import multiprocessing

import torch

from bench.engine_process import ChildProcess

SECRET = "cluster-secret"


def layer_tensors(num_layers: int, num_blocks: int, block_shape: tuple[int, ...], dtype: str, seed: int):
    """Deterministic KV pools: the receiver recomputes them to check every byte."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn((num_blocks, *block_shape), generator=generator).to(getattr(torch, dtype))
        for _ in range(num_layers)
    ]


def token_major(layer: torch.Tensor) -> torch.Tensor:
    """``layer``'s values with tokens before heads in memory (vLLM's GPU cache layout, LBNHC: FlashAttention's
    NHD), seen through the logical [blocks, heads, tokens, content] view vLLM hands the connector: not contiguous."""
    return layer.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


def block_hashes(n: int) -> list[bytes]:
    return [i.to_bytes(16, "big") for i in range(n)]


def _sender_main(conn, spec: dict) -> None:
    from kv_transfer.grpc_service import KVTransferServer
    from kv_transfer.transfer import TransferRegistry

    if spec.get("corrupt"):  # every checksum this sender sends is off by one, as if a byte flipped on the way
        import kv_transfer.dist_channel as dist_channel
        import kv_transfer.grpc_service as service

        class Corrupting:
            @staticmethod
            def xxh3_64_intdigest(data) -> int:
                import xxhash

                return (xxhash.xxh3_64_intdigest(data) + 1) % 2**64

        service.xxhash = Corrupting
        true_checksum = dist_channel._checksum
        dist_channel._checksum = lambda parts: true_checksum(parts) + 1
    if spec.get("silent_store"):  # its torch.distributed store accepts connections and never answers (hung, starved)
        import socket

        import torch.distributed

        class SilentStore:
            def __init__(self, host: str, port: int, **options):
                self._listener = socket.create_server((host, port))  # listening; nothing ever reads
                self.port = self._listener.getsockname()[1]

        torch.distributed.TCPStore = SilentStore
    registry = TransferRegistry(
        "", "m", lease_s=spec.get("lease_s", 30.0), on_freed=lambda tid, state: conn.send(("freed", tid, state.name))
    )
    server = KVTransferServer(registry, SECRET, stall_timeout_s=spec.get("stall_s", 5.0)).start()
    layers = layer_tensors(spec["layers"], spec["blocks"], tuple(spec["block_shape"]), spec["dtype"], spec["seed"])
    if "heads" in spec:  # one tensor-parallel rank's share of the KV heads
        first, count = spec["heads"]
        layers = [layer[:, first : first + count].contiguous() for layer in layers]
    layers = [layer.to(spec.get("device", "cpu")) for layer in layers]
    if spec.get("token_major"):
        layers = [token_major(layer) for layer in layers]
    conn.send(("ready", server.address))
    while conn.poll(120):
        command, *args = conn.recv()
        if command == "offer":
            transfer_id, block_ids, layers_ready, num_blocks, segment = args
            handle = registry.offer(
                transfer_id, layers, block_ids, block_hashes(num_blocks), 16 * num_blocks, layers_ready=layers_ready,
                segment=segment,
            )  # fmt: skip
            conn.send(("handle", handle.to_bytes()))
        elif command == "extend":
            registry.extend(*args)
        elif command == "layer_ready":
            registry.mark_layer_ready(*args)
        elif command == "status":
            status = registry.status(args[0])
            conn.send(("status", status.state.name, status.bytes_sent))
        elif command == "stop":
            break
    server.stop()


class SenderProcess(ChildProcess):
    """A sender in its own process: ``offer`` returns a handle; ``kill`` is a real SIGKILL."""

    def __init__(self, **spec):
        defaults = dict(layers=4, blocks=32, block_shape=(8, 16, 64), dtype="float32", seed=0)
        self.spec = {**defaults, **spec}
        super().__init__(_sender_main, self.spec)
        self.freed: list[tuple[str, str]] = []
        self.address = self._expect("ready", 60)[0]

    def layers(self):
        s = self.spec
        return layer_tensors(s["layers"], s["blocks"], tuple(s["block_shape"]), s["dtype"], s["seed"])

    def offer(
        self,
        transfer_id: str,
        block_ids: list[int],
        layers_ready: int | None = None,
        num_blocks: int | None = None,
        segment: int | None = None,
    ):
        """Offer ``block_ids`` of a transfer of ``num_blocks`` (default: as many), the first ``segment`` computed
        up to ``layers_ready`` (``TransferRegistry.offer``)."""
        from kv_transfer.transfer import TransferHandle

        self._conn.send(("offer", transfer_id, block_ids, layers_ready, num_blocks or len(block_ids), segment))
        return TransferHandle.from_bytes(self._expect("handle")[0])

    def extend(self, transfer_id: str, block_ids: list[int], segment_end: int) -> None:
        """The next chunk of the prompt runs (``TransferRegistry.extend``)."""
        self._conn.send(("extend", transfer_id, block_ids, segment_end))

    def mark_layer_ready(self, transfer_id: str, layer: int) -> None:
        self._conn.send(("layer_ready", transfer_id, layer))

    def status(self, transfer_id: str) -> tuple[str, int]:
        self._conn.send(("status", transfer_id))
        return tuple(self._expect("status"))

    def wait_freed(self, transfer_id: str, timeout_s: float = 10.0) -> str:
        while not any(tid == transfer_id for tid, _ in self.freed):
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"{transfer_id} was not freed within {timeout_s} s")
            self._take(self._conn.recv())
        return next(state for tid, state in self.freed if tid == transfer_id)

    def _expect(self, kind: str, timeout_s: float = 30.0):
        while self._conn.poll(timeout_s):
            message = self._conn.recv()
            if message[0] == kind:
                return message[1:]
            self._take(message)
        raise TimeoutError(f"sender did not answer {kind!r} within {timeout_s} s")

    def _take(self, message) -> None:
        if message[0] == "freed":
            self.freed.append((message[1], message[2]))


def _receiver_main(handle_bytes: bytes, stall_s: float) -> None:
    from kv_transfer.channel import GrpcKVChannel
    from kv_transfer.transfer import TransferHandle

    handle = TransferHandle.from_bytes(handle_bytes)
    shape, dtype = (handle.num_blocks, *handle.block_shape()), getattr(torch, handle.dtype)
    dest = [torch.zeros(shape, dtype=dtype) for _ in range(handle.num_layers)]
    GrpcKVChannel(SECRET).pull(handle, dest, list(range(handle.num_blocks)), stall_timeout_s=stall_s, timeout_s=600)


def start_receiver(handle, stall_s: float = 600.0) -> multiprocessing.Process:
    """A receiver process that pulls ``handle`` (and waits as long as the sender makes it)."""
    process = multiprocessing.get_context("spawn").Process(
        target=_receiver_main, args=(handle.to_bytes(), stall_s), daemon=True
    )
    process.start()
    return process
