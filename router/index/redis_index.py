"""Redis prefix index: one view of every worker's cache, shared by every router replica.

Keys (``{ns}`` = ``pdserve:v{SCHEME_VERSION}:{model_id}:``, so two hash-scheme
versions or two models never read each other's entries):

- ``{ns}blk:{hex}``      SET of worker ids holding that block
- ``{ns}held:{worker}``  SET of block hexes the worker holds (to drop them on restart, clear or death)
- ``{ns}epoch``          HASH worker id → epoch of the incarnation whose entries are stored
- ``{ns}workers``        HASH worker id → JSON ``WorkerInfo`` (role, epoch, block size, load)
- ``{ns}alive:{worker}`` the worker's epoch, with the heartbeat TTL: no key, not live

Each operation is one server-side Lua script, so a match is one round trip
whatever the chain length, and a batch of events is one atomic write.

When Redis is unreachable the index answers from its last view of the live
workers with no cached prefixes (placement falls back to load alone), logs one
warning per outage, counts it, and retries with backoff.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

from engine.block_hash import SCHEME_VERSION
from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent
from router.index.base import IndexHealth, WorkerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Drops every entry of worker ``w`` (the caller sets ``p`` and ``w``).
_DROP_ALL = """
local function drop_all(p, w)
  local held = p .. 'held:' .. w
  for _, h in ipairs(redis.call('SMEMBERS', held)) do redis.call('SREM', p .. 'blk:' .. h, w) end
  redis.call('DEL', held)
end
-- A stale epoch is refused; a newer one drops what the old incarnation held.
local function advance_epoch(p, w, epoch)
  local known = tonumber(redis.call('HGET', p .. 'epoch', w) or '-1')
  if epoch < known then return false end
  if epoch > known then
    drop_all(p, w)
    redis.call('HSET', p .. 'epoch', w, epoch)
  end
  return true
end
"""

_APPLY = (
    _DROP_ALL
    + """
local p, w, epoch = KEYS[1], ARGV[1], tonumber(ARGV[2])
if not advance_epoch(p, w, epoch) then return 0 end
local held = p .. 'held:' .. w
local i = 3
while i <= #ARGV do
  local op, n = ARGV[i], tonumber(ARGV[i + 1])
  for j = i + 2, i + 1 + n do
    if op == 'S' then
      redis.call('SADD', p .. 'blk:' .. ARGV[j], w)
      redis.call('SADD', held, ARGV[j])
    else
      redis.call('SREM', p .. 'blk:' .. ARGV[j], w)
      redis.call('SREM', held, ARGV[j])
    end
  end
  if op == 'C' then drop_all(p, w) end
  i = i + 2 + n
end
return 1
"""
)

_HEARTBEAT = (
    _DROP_ALL
    + """
local p, w, epoch, info, ttl_ms = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if not advance_epoch(p, w, epoch) then return 0 end
redis.call('HSET', p .. 'workers', w, info)
redis.call('SET', p .. 'alive:' .. w, epoch, 'PX', ttl_ms)
return 1
"""
)

_MATCH = """
local p = KEYS[1]
local entries = redis.call('HGETALL', p .. 'workers')
local infos, active, counts = {}, {}, {}
for i = 1, #entries, 2 do
  if redis.call('EXISTS', p .. 'alive:' .. entries[i]) == 1 then
    infos[#infos + 1] = entries[i + 1]
    active[#active + 1] = entries[i]
  end
end
for depth = 1, #ARGV do
  if #active == 0 then break end
  local hits = redis.call('SMISMEMBER', p .. 'blk:' .. ARGV[depth], unpack(active))
  local still = {}
  for k = 1, #active do
    if hits[k] == 1 then
      counts[#counts + 1] = active[k]
      counts[#counts + 1] = depth
      still[#still + 1] = active[k]
    end
  end
  active = still
end
return {infos, counts}
"""

_FORGET = (
    _DROP_ALL
    + """
local p, w = KEYS[1], ARGV[1]
drop_all(p, w)
redis.call('HDEL', p .. 'workers', w)
redis.call('HDEL', p .. 'epoch', w)
redis.call('DEL', p .. 'alive:' .. w)
return 1
"""
)

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
_MAX_BACKOFF_S = 5.0


class RedisPrefixIndex:
    def __init__(self, url: str, model_id: str, timeout_s: float = 0.5):
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._ns = f"pdserve:v{SCHEME_VERSION}:{model_id}:"
        self._apply = self._client.register_script(_APPLY)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._match = self._client.register_script(_MATCH)
        self._forget = self._client.register_script(_FORGET)
        self._last_live: list[WorkerInfo] = []
        self._available = True
        self._outages = 0
        self._failed_calls = 0
        self._backoff_s = 0.0
        self._retry_at = 0.0

    @property
    def namespace(self) -> str:
        return self._ns

    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        args: list[str | int] = [worker_id, epoch]
        for event in events:
            if isinstance(event, BlocksStored | BlocksRemoved):
                args += ["S" if isinstance(event, BlocksStored) else "R", len(event.hashes)]
                args += [h.hex() for h in event.hashes]
            elif isinstance(event, AllCleared):
                args += ["C", 0]
        self._guard(lambda: self._apply(keys=[self._ns], args=args), None)

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> None:
        info = json.dumps(worker.to_dict())
        ttl_ms = max(1, int(ttl_s * 1000))
        self._guard(lambda: self._heartbeat(keys=[self._ns], args=[worker.worker_id, worker.epoch, info, ttl_ms]), None)

    def match(self, chain: Sequence[bytes]) -> tuple[list[WorkerInfo], dict[str, int]]:
        def call():
            infos, flat = self._match(keys=[self._ns], args=[h.hex() for h in chain])
            live = [WorkerInfo.from_dict(json.loads(raw)) for raw in infos]
            counts = dict.fromkeys((w.worker_id for w in live), 0)
            for i in range(0, len(flat), 2):
                counts[flat[i].decode()] = int(flat[i + 1])
            self._last_live = live
            return live, counts

        return self._guard(call, (self._last_live, dict.fromkeys((w.worker_id for w in self._last_live), 0)))

    def live_workers(self) -> list[WorkerInfo]:
        return self.match([])[0]

    def forget_worker(self, worker_id: str) -> None:
        self._guard(lambda: self._forget(keys=[self._ns], args=[worker_id]), None)

    def sweep(self) -> int:
        def call() -> int:
            workers = [w.decode() for w in self._client.hkeys(self._ns + "epoch")]
            pipe = self._client.pipeline(transaction=False)
            for worker_id in workers:
                pipe.exists(self._ns + "alive:" + worker_id)
            dead = [w for w, alive in zip(workers, pipe.execute(), strict=True) if not alive]
            for worker_id in dead:
                self._forget(keys=[self._ns], args=[worker_id])
            return len(dead)

        return self._guard(call, 0)

    def health(self) -> IndexHealth:
        return IndexHealth(available=self._available, outages=self._outages, failed_calls=self._failed_calls)

    def close(self) -> None:
        self._client.close()

    def _guard(self, call: Callable[[], T], fallback: T) -> T:
        now = time.monotonic()
        if not self._available and now < self._retry_at:
            self._failed_calls += 1
            return fallback
        try:
            result = call()
        except redis.AuthenticationError:
            raise  # a wrong password is a configuration error, not an outage: say so loudly
        except _UNREACHABLE as exc:
            self._failed_calls += 1
            self._backoff_s = min(_MAX_BACKOFF_S, max(0.1, 2 * self._backoff_s))
            self._retry_at = now + self._backoff_s
            if self._available:
                self._available = False
                self._outages += 1
                log.warning("prefix index unreachable, placing on load alone: %s", exc)
            return fallback
        if not self._available:
            self._available = True
            self._backoff_s = 0.0
            log.info("prefix index reachable again after %d failed calls", self._failed_calls)
        return result
