"""What the serving process asks vLLM's worker processes, through ``collective_rpc``.

vLLM mixes this class into its worker class (``worker_extension_cls``, its
public hook for ``collective_rpc`` methods), in every worker process: one per
tensor-parallel rank, or the engine core's own process with one rank. The KV
connector's worker side lives there (its transfer registry, its KV server), so
questions about transfers are asked there. Each method answers for its rank;
the engine adds the ranks up.

The one private surface pdserve reads in vLLM lives here: ``model_runner.kv_caches``
and ``model_runner.kv_cache_config`` (vLLM 0.32), the live KV tensors and their
groups, for ``pdserve_kv_layout``. vLLM publishes no
description of its cache layout, and the connector needs the exact one.
"""

from __future__ import annotations

import dataclasses


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


class PdserveWorkerExtension:
    def pdserve_kv_handshake(self) -> dict | None:
        """This rank's connector's handshake metadata (where its KV server listens, its heads, its fingerprint)."""
        connector = _connector()
        metadata = connector.get_handshake_metadata() if connector is not None else None
        return dataclasses.asdict(metadata) if metadata is not None else None

    def pdserve_abort_transfer(self, transfer_id: str) -> None:
        abort = getattr(_connector(), "abort_transfer", None)
        if abort is not None:
            abort(transfer_id)

    def pdserve_open_transfers(self) -> int:
        count = getattr(_connector(), "open_transfers", None)
        return count() if count is not None else 0

    def pdserve_transfer_stats(self) -> dict[str, dict]:
        stats = getattr(_connector(), "transfer_stats", None)
        return stats() if stats is not None else {}

    def pdserve_transfer_times(self, transfer_id: str) -> dict[str, float]:
        times = getattr(_connector(), "transfer_times", None)
        return times(transfer_id) if times is not None else {}

    def pdserve_kv_layout(self) -> dict:
        runner = self.model_runner  # private in vLLM 0.32: see the module docstring
        first, kv_config = runner.kv_caches[0], runner.kv_cache_config
        return {
            "device": first.device.type,
            "dtype": str(first.dtype).removeprefix("torch."),
            "num_blocks": int(first.shape[0]),
            "block_shape": tuple(first.shape[1:]),
            "layer_names": [name for group in kv_config.kv_cache_groups for name in group.layer_names],
            "cache_layout": getattr(kv_config, "kv_cache_layout", None) or "",
        }
