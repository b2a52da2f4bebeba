"""One config schema from file, then PDSERVE_* env, then flags; errors name the field."""

import re

import pytest

from pdserve.config import ConfigError, load_config, parse_assignment, with_settings


def write(tmp_path, text):
    path = tmp_path / "pdserve.yaml"
    path.write_text(text)
    return path


def test_defaults_need_no_source():
    config = load_config()
    assert config.engine.model is None
    assert config.engine.block_size == 128


def test_env_overrides_file_and_flags_override_env(tmp_path):
    path = write(tmp_path, "engine:\n  block_size: 32\n  max_num_seqs: 8\n  kv_cache_gib: 2\n")
    env = {"PDSERVE_ENGINE__BLOCK_SIZE": "64", "PDSERVE_ENGINE__MAX_NUM_SEQS": "16", "HOME": "/x"}
    config = load_config(path, env, {"engine.block_size": 96})
    assert config.engine.block_size == 96
    assert config.engine.max_num_seqs == 16
    assert config.engine.kv_cache_gib == 2


def test_unset_flags_do_not_override(tmp_path):
    config = load_config(write(tmp_path, "engine:\n  block_size: 32\n"), {}, {"engine.block_size": None})
    assert config.engine.block_size == 32


def test_settings_applied_to_a_config_clear_a_field_given_none():
    config = load_config(overrides={"service.decode.autoscaling": {"max_replicas": 4}, "engine.block_size": 32})
    changed = with_settings(config, {"service.decode.autoscaling": None, "service.decode.num_replicas": 3})
    assert changed.service.decode.autoscaling is None
    assert changed.service.decode.num_replicas == 3
    assert changed.engine.block_size == 32  # the rest kept


def test_settings_applied_to_a_config_keep_both_pools_autoscaling_as_given():
    config = load_config(overrides={"service.prefill.autoscaling": {"max_replicas": 2},
                                    "service.decode.autoscaling": {"target_running_seqs": 6}})  # fmt: skip
    changed = with_settings(config, {"service.http_port": 1234})
    assert changed.service.prefill.autoscaling == config.service.prefill.autoscaling
    assert changed.service.decode.autoscaling.target_running_seqs == 6


def test_settings_applied_to_a_config_keep_a_secret_given_not_its_mask():
    config = load_config(overrides={"cluster_token": "a-token-of-the-cluster"})
    changed = with_settings(config, {"service.http_port": 1234})
    assert changed.cluster_token.get_secret_value() == "a-token-of-the-cluster"


def test_settings_applied_to_a_config_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match=r"engine\.block_size"):
        with_settings(load_config(), {"engine.block_size": 0})


def test_settings_refuse_a_field_given_with_the_section_that_holds_it():
    with pytest.raises(ConfigError, match=r"service\.decode\.autoscaling\.max_replicas"):
        with_settings(load_config(), {"service.decode.autoscaling.max_replicas": 4, "service.decode.autoscaling": None})


def test_overrides_refuse_a_field_given_with_the_section_that_holds_it():
    with pytest.raises(ConfigError, match=r"engine\.dtype: set together"):
        load_config(overrides={"engine.dtype": "float32", "engine": {"dtype": "bfloat16"}})


def test_a_benchmarks_simulated_arm_clears_every_vllm_setting_of_the_real_arm():
    from bench.running import on_the_simulated_engine

    real = load_config(overrides={"engine.dtype": "float32", "engine.gpu_memory_utilization": 0.8,
                                  "engine.kv_events_endpoint": "tcp://127.0.0.1:5557", "engine.seed": 7})  # fmt: skip
    simulated = with_settings(real, on_the_simulated_engine(num_kv_blocks=64))
    assert simulated.engine.kind == "simulated"
    assert simulated.engine.gpu_memory_utilization is None and simulated.engine.kv_events_endpoint is None


@pytest.mark.parametrize(
    "source,field",
    [
        ({"engine.block_size": 0}, "engine.block_size"),
        ({"engine.dtype": "float8"}, "engine.dtype"),
        ({"engine.kv_cache_gib": -1}, "engine.kv_cache_gib"),
        ({"engine.no_such_field": 1}, "engine.no_such_field"),
        ({"no_such_section": 1}, "no_such_section"),
    ],
)
def test_invalid_values_are_reported_by_field(source, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=source)


def test_env_values_are_validated_too():
    with pytest.raises(ConfigError, match=r"engine\.block_size"):
        load_config(env={"PDSERVE_ENGINE__BLOCK_SIZE": "lots"})


def test_model_must_be_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.model.*no config\.json"):
        load_config(overrides={"engine.model": str(tmp_path)})


def test_broken_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "engine: [unclosed\n")
    with pytest.raises(ConfigError, match="pdserve.yaml"):
        load_config(path)


def test_set_assignments_read_values_as_yaml():
    assert parse_assignment("engine.kv_cache_gib=2.5") == ("engine.kv_cache_gib", 2.5)
    assert parse_assignment("engine.enforce_eager=false") == ("engine.enforce_eager", False)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("engine.block_size")


def test_set_gives_a_text_field_the_text_typed_even_where_yaml_reads_a_number():
    assert parse_assignment("service.decode.cpu_cores=1") == ("service.decode.cpu_cores", "1")
    assert parse_assignment("engine.model_id=7") == ("engine.model_id", "7")
    assert parse_assignment("engine.max_model_len=null") == ("engine.max_model_len", None)
    assert parse_assignment("service.transfer.backends=[grpc]") == ("service.transfer.backends", ["grpc"])
    config = load_config(overrides=dict([parse_assignment("service.decode.cpu_cores=1"),
                                         parse_assignment("cluster_token=12345")]))  # fmt: skip
    assert config.service.decode.cpu_cores == "1" and config.cluster_token.get_secret_value() == "12345"


def test_set_leaves_a_value_no_reading_fits_to_validation_which_names_the_field():
    with pytest.raises(ConfigError, match="engine.block_size"):
        load_config(overrides=dict([parse_assignment("engine.block_size=lots")]))


def test_router_settings_come_from_the_same_schema(tmp_path):
    path = write(tmp_path, "router:\n  placement:\n    policy: round_robin\n")
    env = {"PDSERVE_ROUTER__INDEX__REDIS_URL": "redis://127.0.0.1:6379/0"}
    config = load_config(path, env, {"router.placement.local_prefill_max_uncached_tokens": 64})
    assert config.router.placement.policy == "round_robin"
    assert config.router.index.redis_url == "redis://127.0.0.1:6379/0"
    assert config.router.placement.local_prefill_max_uncached_tokens == 64


def test_an_unknown_policy_is_named():
    with pytest.raises(ConfigError, match=r"router\.placement\.policy"):
        load_config(overrides={"router.placement.policy": "random"})


def test_request_limits_combine_config_and_model_figures():
    config = load_config(overrides={"router.limits.max_stop_strings": 2})
    limits = config.router.limits.for_model(context_length=512, vocab_size=1024)
    assert (limits.max_stop_strings, limits.context_length, limits.vocab_size) == (2, 512, 1024)


@pytest.mark.parametrize(
    "router",
    [{"num_replicas": 2}, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}],
    ids=["fixed", "autoscaled"],
)
def test_more_than_one_router_replica_needs_the_redis_index(router):
    service = {"router": router, "http_server": "serve_proxy"}  # Serve sees the requests it scales routers on
    with pytest.raises(ConfigError, match="router.index.redis_url"):
        load_config(data={"service": service})
    config = load_config(data={"service": service, "router": {"index": {"redis_url": "redis://h:1"}}})
    assert config.service.router.most_replicas >= 2


@pytest.mark.parametrize(
    ("pool", "replicas"),
    [
        ({"num_replicas": 3}, 3),
        ({"autoscaling": {"min_replicas": 2, "max_replicas": 5}}, 2),
        ({"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}}, 1),
        ({"autoscaling_config": {"min_replicas": 1, "initial_replicas": 3, "max_replicas": 4}}, 3),
    ],
)
def test_a_pool_starts_with_its_fixed_count_or_its_autoscalers_first_count(pool, replicas):
    """What ``pdserve up`` waits to see live before it calls the service ready."""
    config = load_config(overrides={"service.decode": pool})
    assert config.service.decode.replicas_at_start == replicas


@pytest.mark.parametrize("role", ["router", "decode"])
def test_a_router_or_decode_pool_of_no_replicas_is_refused_at_load(role):
    with pytest.raises(ConfigError, match=f"service.{role}.num_replicas: 0 leaves no {role} replica"):
        load_config(overrides={f"service.{role}.num_replicas": 0})


def test_a_prefill_pool_of_no_replicas_is_accepted_as_left_out():
    assert not load_config(overrides={"service.prefill.num_replicas": 0}).service.prefill.present


def test_tls_for_kv_takes_all_three_files_and_refuses_a_missing_one_at_load(tmp_path):
    for name in ("a.crt", "a.key", "ca.crt"):
        (tmp_path / name).write_text("pem")
    files = {"service.transfer.tls_cert_file": str(tmp_path / "a.crt"),
             "service.transfer.tls_key_file": str(tmp_path / "a.key"),
             "service.transfer.tls_ca_file": str(tmp_path / "ca.crt")}  # fmt: skip
    extra = load_config(overrides=files).service.transfer.connector_extra()
    assert extra["tls_ca_file"] == str(tmp_path / "ca.crt") and extra["lease_s"] == 30.0
    assert extra["pull_timeout_s"] == 600.0
    with pytest.raises(ConfigError, match="TLS for KV needs tls_ca_file too"):
        load_config(overrides={k: v for k, v in files.items() if not k.endswith("ca_file")})
    with pytest.raises(ConfigError, match="tls_key_file: .* is not a readable file"):
        load_config(overrides={**files, "service.transfer.tls_key_file": str(tmp_path / "gone.key")})


@pytest.mark.parametrize(
    "source,field",
    [
        ({"service.decode.num_gpus": 1, "service.decode.kv_cache_gib": 4}, "service.decode.kv_cache_gib"),
        ({"service.prefill.num_gpus": 1, "service.prefill.engine": {"kv_cache_gib": 4}},
         "service.prefill.engine.kv_cache_gib"),
        ({"service.decode.num_gpus": 1, "engine.kv_cache_gib": 2}, "engine.kv_cache_gib"),
    ],
    ids=["pool", "pool-engine", "engine"],
)  # fmt: skip
def test_kv_cache_gib_given_for_a_gpu_pool_is_refused_pointing_to_gpu_memory_utilization(source, field):
    with pytest.raises(ConfigError, match=re.escape(field) + r": .*CPU only.*engine\.gpu_memory_utilization"):
        load_config(overrides=source)


def test_kv_cache_gib_from_env_counts_as_given():
    with pytest.raises(ConfigError, match=r"engine\.kv_cache_gib"):
        load_config(env={"PDSERVE_ENGINE__KV_CACHE_GIB": "2"}, overrides={"service.prefill.num_gpus": 1})


def test_the_default_kv_cache_gib_does_not_stop_gpu_pools():
    config = load_config(overrides={"service.prefill.num_gpus": 1, "service.decode.num_gpus": 1})
    assert config.engine.kv_cache_gib == 1


def test_a_cpu_pool_keeps_its_kv_cache_gib_beside_a_gpu_pool():
    config = load_config(overrides={"service.decode.num_gpus": 1, "service.prefill.kv_cache_gib": 4})
    assert config.service.prefill.kv_cache_gib == 4


def test_a_gpu_config_written_as_a_serve_config_loads_back_without_a_kv_cache_gib_it_never_gave():
    from pdserve.app import serve_application

    config = load_config(overrides={"service.decode.num_gpus": 1, "engine.gpu_memory_utilization": 0.9})
    args = serve_application(config)["args"]
    assert "kv_cache_gib" not in args["engine"]
    assert load_config(data=args).engine.gpu_memory_utilization == 0.9


@pytest.mark.parametrize(
    "source,field",
    [
        ({"service.decode.cpu_cores": "1"}, "service.decode.cpu_cores: "),
        ({"engine.cpu_cores": "1"}, "engine: cpu_cores "),
        ({"service.prefill.engine": {"nice": 5}}, "service.prefill.engine: nice "),
    ],
    ids=["pool", "engine", "pool-engine"],
)
def test_cores_given_for_a_simulated_engine_that_sleeps_are_refused(source, field):
    """Its steps take no CPU: cores or a niceness for them would be accepted and ignored."""
    simulated = {"engine.kind": "simulated", "engine.num_kv_blocks": 64}
    with pytest.raises(ConfigError, match=re.escape(field) + r".*only with simulated_compute: cores"):
        load_config(overrides={**simulated, **source})
    load_config(overrides={**simulated, **source, "engine.simulated_compute": "cores"})
