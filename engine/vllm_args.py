"""The one place that turns pdserve's engine config into vLLM's arguments and environment.

Nothing else in pdserve sets ``VLLM_*`` variables. vLLM reads them from the
process environment (its engine core and worker processes inherit it), so one
serving process runs one engine: the worker's.
"""

from __future__ import annotations

import os

from engine.block_hash import SCHEME_VERSION
from engine.config import EngineConfig

WORKER_EXTENSION = "engine.worker_extension.PdserveWorkerExtension"


def vllm_environment(config: EngineConfig, rpc_dir: str) -> dict[str, str]:
    env = {
        # The engine core in a process of its own, as vLLM's server runs it (whatever the environment says).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        # ...and its worker processes spawned, never forked, wherever the engine runs. vLLM forks by default
        # outside a Ray actor on a GPU node (a benchmark's engine, `generate --local`), and pdserve turns grpcio's
        # fork handlers off (pdserve/grpc_fork.py): a forked engine core would run the KV connector's gRPC in a
        # child of a process whose gRPC threads did not survive the fork. vLLM-CPU and Ray actors spawn already.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        # vLLM's ZMQ ipc sockets: in the engine's own directory, removed with it (vLLM leaves them in /tmp).
        "VLLM_RPC_BASE_PATH": rpc_dir,
        "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
        "VLLM_LOGGING_LEVEL": config.log_level,
        "VLLM_NO_USAGE_STATS": "1",
    }
    if config.cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_cores
    return env


def apply_vllm_environment(config: EngineConfig, rpc_dir: str) -> None:
    os.environ.update(vllm_environment(config, rpc_dir))


def vllm_engine_args(config: EngineConfig, kv_events_endpoint: str | None):
    from vllm import AsyncEngineArgs
    from vllm.config import KVEventsConfig, KVTransferConfig

    kv_transfer = None
    if config.kv_connector is not None:
        spec = config.kv_connector
        kv_transfer = KVTransferConfig(
            kv_connector=spec.class_name,
            kv_connector_module_path=spec.module_path,
            kv_role=spec.role,
            # The block-hash scheme the block hashes it carries follow: part of the KV fingerprint.
            kv_connector_extra_config={"hash_scheme": SCHEME_VERSION, **spec.extra},
            # A failed KV load is recomputed locally: a request is never lost to a transfer.
            kv_load_failure_policy="recompute",
        )
    kv_events = None
    if kv_events_endpoint is not None:
        kv_events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint)
    return AsyncEngineArgs(
        model=str(config.model),
        served_model_name=config.served_model_id,
        dtype=config.dtype,
        block_size=config.block_size,
        num_gpu_blocks_override=config.num_kv_blocks,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_prefix_caching=config.enable_prefix_caching,
        enable_chunked_prefill=config.enable_chunked_prefill,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        tensor_parallel_size=config.tensor_parallel_size,
        distributed_executor_backend="mp" if config.tensor_parallel_size > 1 else None,
        kv_cache_dtype=config.kv_cache_dtype,
        kv_transfer_config=kv_transfer,
        kv_events_config=kv_events,
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=False,  # pdserve's stat logger reads the scheduler's figures (engine.py)
        use_tqdm_on_load=config.log_level in ("DEBUG", "INFO"),  # quiet by default
        **({"gpu_memory_utilization": config.gpu_memory_utilization} if config.gpu_memory_utilization else {}),
    )
