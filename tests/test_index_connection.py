"""How a replica reaches the index's Redis: the URL as its node has it, the password from a file on that node.

The cluster files run Redis on the head with a password and export RAY_HEAD_IP on every node; the
Serve configs say ``redis://${RAY_HEAD_IP}:6380/1`` and name the password file, so neither the
address nor the secret is written into a Serve config.
"""

from __future__ import annotations

import pytest
import redis

from router.config import IndexConfig, IndexConfigError


def test_a_variable_in_the_url_is_the_environment_variable_where_the_replica_runs():
    config = IndexConfig(redis_url="redis://${RAY_HEAD_IP}:6380/1")

    assert config.connection_url({"RAY_HEAD_IP": "10.0.0.7"}) == "redis://10.0.0.7:6380/1"


def test_a_variable_not_set_where_the_replica_runs_is_an_error_naming_it():
    config = IndexConfig(redis_url="redis://${RAY_HEAD_IP}:6380/1")

    with pytest.raises(IndexConfigError, match=r"router.index.redis_url names \$\{RAY_HEAD_IP\}"):
        config.connection_url({})


def test_the_password_file_goes_into_the_url_quoted(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("p@ss:w/rd\n")
    config = IndexConfig(redis_url="redis://10.0.0.7:6380/1", redis_password_file=secret)

    assert config.connection_url({}) == "redis://:p%40ss%3Aw%2Frd@10.0.0.7:6380/1"


def test_a_user_in_the_url_is_kept_as_spelled_beside_the_password_file(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret")
    config = IndexConfig(redis_url="redis://al%40ice@h:6380/1", redis_password_file=secret)

    assert config.connection_url({}) == "redis://al%40ice:s3cret@h:6380/1"


def test_the_password_file_is_read_from_the_home_of_the_node_the_replica_runs_on(tmp_path, monkeypatch):
    (tmp_path / ".pdserve").mkdir()
    (tmp_path / ".pdserve" / "redis-password").write_text("s3cret")
    monkeypatch.setenv("HOME", str(tmp_path))
    config = IndexConfig(redis_url="redis://h:6380/1", redis_password_file="~/.pdserve/redis-password")

    assert config.connection_url({}) == "redis://:s3cret@h:6380/1"


def test_a_missing_password_file_is_an_error_naming_the_field_and_the_file(tmp_path):
    config = IndexConfig(redis_url="redis://h:6380/1", redis_password_file=tmp_path / "absent")

    with pytest.raises(IndexConfigError, match="router.index.redis_password_file .*absent"):
        config.connection_url({})


def test_an_empty_password_file_is_an_error(tmp_path):
    (tmp_path / "empty").write_text("\n")
    config = IndexConfig(redis_url="redis://h:6380/1", redis_password_file=tmp_path / "empty")

    with pytest.raises(IndexConfigError, match="is empty"):
        config.connection_url({})


def test_a_password_in_the_url_and_a_password_file_are_refused_together(tmp_path):
    with pytest.raises(ValueError, match="give one"):
        IndexConfig(redis_url="redis://:inline@h:6380/1", redis_password_file=tmp_path / "secret")


def test_a_password_file_without_a_url_is_refused(tmp_path):
    with pytest.raises(ValueError, match="without redis_url"):
        IndexConfig(redis_password_file=tmp_path / "secret")


def test_the_index_connects_to_a_password_protected_redis_with_the_file_and_not_without(tmp_path):
    from pdserve.local_redis import LocalRedis

    server = LocalRedis(tmp_path, password="file-secret").start()
    try:
        secret = tmp_path / "redis-password"
        secret.write_text("file-secret")
        url = f"redis://127.0.0.1:{server.port}/0"
        with_file = IndexConfig(redis_url=url, redis_password_file=secret)
        assert redis.Redis.from_url(with_file.connection_url({}), socket_timeout=2).ping()

        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(IndexConfig(redis_url=url).connection_url({}), socket_timeout=2).ping()
    finally:
        server.stop()
