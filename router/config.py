"""The router's part of pdserve's config: the prefix index, placement, and request limits."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router.placement import PlacementConfig
from router.request import RequestLimits


class IndexConfigError(ValueError):
    """The index's Redis connection cannot be made from the config where this replica runs."""


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL; ${NAME} in it is the environment variable NAME where each "
        "replica runs (the deploy/ cluster files export RAY_HEAD_IP on every node); none: in-memory index",
    )
    redis_password_file: Path | None = Field(
        default=None,
        description="file holding the Redis password, read where each replica runs (~: that node's home), so the "
        "password stays out of Serve configs; the URL then carries none",
    )
    timeout_s: float = Field(default=0.5, gt=0, description="deadline of one Redis call")
    heartbeat_ttl_s: float = Field(default=3.0, gt=0, description="a worker whose heartbeat is this old stops counting")
    sweep_interval_s: float = Field(default=10.0, gt=0, description="how often dead workers' entries are collected")
    in_flight_ttl_s: float = Field(
        default=10.0, gt=0, description="a placement stops counting this long after its router last renewed it"
    )

    @model_validator(mode="after")
    def _one_password(self) -> IndexConfig:
        if self.redis_password_file is None:
            return self
        if not self.redis_url:
            raise ValueError("redis_password_file is given without redis_url")
        if urlsplit(self.redis_url).password is not None:
            raise ValueError("redis_url carries a password and redis_password_file names one: give one")
        return self

    def connection_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The URL this process connects with: ``${NAME}`` expanded from ``environ``, the password file's secret
        inside. None: the in-memory index."""
        if not self.redis_url:
            return None

        def variable(match: re.Match) -> str:
            if match[1] not in environ:
                raise IndexConfigError(f"router.index.redis_url names ${{{match[1]}}}, which is not set here")
            return environ[match[1]]

        url = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", variable, self.redis_url)
        if self.redis_password_file is None:
            return url
        path = self.redis_password_file.expanduser()
        try:
            password = path.read_text().strip()
        except OSError as exc:
            raise IndexConfigError(f"router.index.redis_password_file {path}: {exc.strerror}") from None
        if not password:
            raise IndexConfigError(f"router.index.redis_password_file {path} is empty")
        parts = urlsplit(url)
        user, _, host = parts.netloc.rpartition("@")  # the user as the URL spells it (already %-quoted)
        netloc = f"{user}:{quote(password, safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc))


class RequestLimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_stop_strings: int = Field(default=16, ge=0)
    max_choices: int = Field(
        default=16, ge=1, description="sequences one request may ask for: n, times the prompts of a batch"
    )
    default_max_tokens: int = Field(
        default=16, ge=1, description="a completion without max_tokens (OpenAI's and vLLM's 16); a chat without "
        "it may generate to the end of the context, as vLLM's server allows",
    )  # fmt: skip

    def for_model(self, context_length: int, vocab_size: int, auto_tool_choice: bool = False) -> RequestLimits:
        return RequestLimits(context_length, vocab_size, auto_tool_choice=auto_tool_choice, **self.model_dump())


class RecoveryConfig(BaseModel):
    """What the router does when a worker is lost: mid-stream, before a request starts, or because of the request.

    A worker's death is charged to the requests whose prompt it was computing (no token streamed from
    it yet); a request charged twice fails with ``PoisonRequestError`` instead of being tried on a third
    worker, so one query of death cannot walk through a pool."""

    model_config = ConfigDict(extra="forbid")

    migrate_decode: bool = Field(
        default=True,
        description="carry the stream on to another decode worker, which prefills the prompt and the tokens "
        "already streamed; off: the client gets UNAVAILABLE / an HTTP error",
    )
    max_migrations: int = Field(default=2, ge=0, description="decode workers one request may lose before it fails")
    decode_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="a decode stream with no output this long (after its first token) counts as a lost worker: "
        "a hung process or a node cut off the network",
    )
    wait_for_worker_s: float = Field(
        default=60.0,
        ge=0,
        description="a request that finds no live decode worker (the pool's replica died and Serve is starting "
        "its replacement) waits this long for one before failing with 503 / UNAVAILABLE; a client's deadline or "
        "disconnect ends the wait sooner, and waiting requests count against max_inflight",
    )
    drain_finish_s: float = Field(
        default=10.0,
        ge=0,
        description="a stream on a decode replica Serve is stopping (scale-down, redeploy) may run this long to "
        "finish there, then moves to another decode worker; keep it under the decode pool's "
        "graceful_shutdown_timeout_s",
    )


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: IndexConfig = Field(default_factory=IndexConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys the generation API accepts as 'Authorization: Bearer <key>' (HTTP header, gRPC metadata); "
        "none: open. From env: PDSERVE_ROUTER__API_KEYS=key1,key2",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [key.strip() for key in value.split(",") if key.strip()] if isinstance(value, str) else value

    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    limits: RequestLimitsConfig = Field(default_factory=RequestLimitsConfig)
