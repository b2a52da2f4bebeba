"""The environment pdserve hands vLLM, read back through vLLM's own accessors."""

from engine.config import EngineConfig
from engine.vllm_args import vllm_environment


def test_vllm_spawns_its_engine_core_outside_a_ray_actor_too(model_dir, monkeypatch, tmp_path):
    """vLLM's default outside a Ray actor (and on a GPU, where vLLM-CPU's own override does not apply) is fork;
    with grpcio's fork handlers off that would leave a forked engine core's gRPC unprotected."""
    from vllm.utils.system_utils import get_mp_context

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    assert get_mp_context().get_start_method() == "fork"  # vLLM's own default here: what the setting changes
    for name, value in vllm_environment(EngineConfig(model=model_dir), str(tmp_path)).items():
        monkeypatch.setenv(name, value)
    assert get_mp_context().get_start_method() == "spawn"
