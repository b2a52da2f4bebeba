"""The engine's part of pdserve's config: what one worker's vLLM is built from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from engine.errors import EngineConfigError
from engine.model_source import HubModel, parse_model


class KVConnectorSpec(BaseModel):
    """Which KV connector vLLM loads, by module path, and in which role."""

    model_config = ConfigDict(extra="forbid")

    module_path: str
    class_name: str
    role: Literal["kv_producer", "kv_consumer", "kv_both"]
    extra: dict = Field(default_factory=dict, description="passed to the connector as kv_connector_extra_config")


# vLLM's own settings: a simulated engine has no weights, kernels, GPU memory, cache element type, random state
# or ZMQ publisher to apply them to. Given to it (a value other than the default), they are refused by name.
VLLM_ONLY_FIELDS = (
    "dtype", "kv_cache_gib", "enable_prefix_caching", "enforce_eager", "gpu_memory_utilization", "kv_cache_dtype",
    "seed", "kv_events_endpoint", "log_level",
)  # fmt: skip


class EngineConfig(BaseModel):
    """One worker's engine. Field docs say what each knob means to vLLM."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm", "simulated"] = Field(
        default="vllm",
        description="vllm serves the model; simulated keeps vLLM's scheduling and KV-cache semantics with no model "
        "behind them (step times from simulated_profile, tokens a function of the prompt): the control plane "
        "at scale, in tests and benchmarks. It needs num_kv_blocks, and has no tensor parallelism, tool calls or "
        "vLLM-only settings (dtype, kv_cache_gib, enable_prefix_caching, enforce_eager, gpu_memory_utilization, "
        "kv_cache_dtype, seed, kv_events_endpoint, log_level)",
    )
    simulated_profile: str | None = Field(
        default=None,
        description="the simulated engine's hardware profile: a name in engine/sim/profile.py "
        "(llama-3.1-8b-h100) or a JSON file of its fields; none: llama-3.1-8b-h100",
    )
    simulated_compute: Literal["sleep", "cores"] = Field(
        default="sleep",
        description="how a simulated step spends its time. sleep: it takes no CPU (many simulated workers on few "
        "cores; an engine whose compute is a GPU's). cores: it is CPU time, spent on the engine's cpu_cores at its "
        "nice beside whatever else runs there, as vLLM-CPU's steps are (engine/sim/compute.py; pdserve bench "
        "simulator checks the simulator against vLLM-CPU so)",
    )
    model: str | None = Field(
        default=None,
        description="a Hugging Face model directory (config, weights, tokenizer) on every node, or a Hugging Face "
        "repo id (org/name), downloaded into each node's Hugging Face cache; none: the tiny model, made on each node",
    )
    revision: str | None = Field(
        default=None,
        description="the repo's branch, tag or commit (vLLM's --revision); none: main. A commit keeps nodes that "
        "download at different times on the same weights",
    )
    download_dir: Path | None = Field(
        default=None,
        description="the Hugging Face cache a repo is downloaded into on each node (vLLM's --download-dir); "
        "none: HF_HOME's (~/.cache/huggingface/hub)",
    )
    model_id: str | None = Field(
        default=None,
        description="name the model is served and hashed under; defaults to the directory name, or the repo id's "
        "name part",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    block_size: int = Field(default=128, ge=1, description="tokens per KV block (vLLM CPU wants a multiple of 32)")
    kv_cache_gib: int = Field(
        default=1, ge=1, description="KV cache memory on CPU in whole GiB (VLLM_CPU_KVCACHE_SPACE); less: num_kv_blocks"
    )
    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="fix the KV pool size in blocks, overriding memory"
    )
    max_model_len: int | None = Field(default=None, ge=1, description="context length; defaults to the model's")
    max_num_seqs: int = Field(default=64, ge=1, description="sequences in one running batch")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, description="tokens per step (chunked prefill); none: vLLM's default"
    )
    enable_chunked_prefill: bool | None = Field(
        default=None, description="split long prompts over steps, beside running decodes; none: vLLM's default (on)"
    )
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(
        default=False,
        description="skip torch.compile (vLLM's default: compile). Compiled, decode steps ran ~20 % faster on CPU "
        "here; eager starts ~35 s sooner the first time (compiled kernels are cached, ~5 s after)",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="ranks one engine is split over, one worker process each (GPUs, or core sets)"
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1,
        description="fraction of each GPU's memory vLLM may take (weights, activations, KV); none: vLLM's default. "
        "On CPU the KV pool is kv_cache_gib",
    )  # fmt: skip
    kv_cache_dtype: Literal["auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto", description="KV cache element type; auto: the model's dtype"
    )
    cpu_cores: str | None = Field(
        default=None,
        description="cores the engine's threads bind to (VLLM_CPU_OMP_THREADS_BIND): '0-3' for one rank, "
        "'0-1|2-3' for two ranks",
    )
    seed: int = 0
    nice: int | None = Field(
        default=None, ge=-20, le=19,
        description="niceness of the processes that step the model (vLLM's rank workers); none: lowered to 0 "
        "where the OS allows (CAP_SYS_NICE), else left as started (Ray workers: 15), and left as started in the "
        "pools whose cores the serving processes share (cpu_cores: auto with no core reserved: the prefill pool, a "
        "co-located decode pool, every pool where ranks outnumber cores). Given, it is applied or the engine fails",
    )  # fmt: skip
    tool_call_parser: str | None = Field(
        default=None,
        description="the model's tool-call format, by vLLM's parser name (--tool-call-parser: hermes, llama3_json, "
        "mistral, ...): chats with tool_choice auto are read for calls; none: auto is refused, required and a named "
        "function still work (JSON)",
    )
    kv_connector: KVConnectorSpec | None = None
    kv_events_endpoint: str | None = Field(
        default=None,
        description="ZMQ endpoint vLLM publishes KV events on, for subscribers in other processes "
        "(e.g. tcp://*:5557); none: a private ipc socket, opened only when the worker subscribes",
    )
    start_timeout_s: float = Field(
        default=900.0, gt=0, description="deadline for loading the model and building the engine"
    )
    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="a request that gets no output for this long fails instead of waiting forever"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="ERROR", description="vLLM's log level; quiet by default"
    )

    @model_validator(mode="after")
    def _simulated_fits(self) -> EngineConfig:
        """What the simulated engine cannot honour is refused by name, not ignored."""
        if self.kind != "simulated":
            if self.simulated_profile is not None:
                raise ValueError("simulated_profile is only for kind: simulated")
            if self.simulated_compute != "sleep":
                raise ValueError("simulated_compute is only for kind: simulated")
            return self
        if self.num_kv_blocks is None:
            raise ValueError("kind simulated needs num_kv_blocks: it has no memory to size its KV pool from")
        if self.tensor_parallel_size != 1:
            raise ValueError("kind simulated runs one rank: tensor_parallel_size must be 1")
        if self.tool_call_parser is not None:
            raise ValueError("kind simulated reads no tool calls: leave tool_call_parser unset")
        for name in VLLM_ONLY_FIELDS:
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} is a vLLM setting the simulated engine has nothing to apply to: leave it "
                                 "unset with kind: simulated")  # fmt: skip
        if self.simulated_compute == "sleep":
            for name in ("cpu_cores", "nice"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} places a simulated engine's steps only with simulated_compute: "
                                     "cores (sleeping steps take no CPU)")  # fmt: skip
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("model")
    @classmethod
    def _model_dir_or_repo_id(cls, value: str | None) -> str | None:
        if value is not None:
            parse_model(value)
        return value

    @field_validator("revision", "download_dir")
    @classmethod
    def _only_for_a_repo(cls, value: object, info: ValidationInfo) -> object:
        """Refused rather than ignored where the model is not downloaded (a directory, or the tiny model)."""
        if "model" not in info.data:  # the model itself is invalid: that error says so
            return value
        model = info.data["model"]
        if value is not None and (model is None or not isinstance(parse_model(model), HubModel)):
            raise ValueError("only for a Hugging Face repo id as engine.model")
        return value

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.model is None:
            raise EngineConfigError("model", "no model directory given")
        return Path(self.model).expanduser().resolve().name  # a directory's name, or a repo id's name part
