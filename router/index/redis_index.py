"""Redis prefix index: one view of every worker's cache, shared by every router replica.

Keys (``{ns}`` = ``pdserve:v{SCHEME_VERSION}:{model_id}:``, so two hash-scheme
versions or two models never read each other's entries; ``{digest}`` is the
block hash's 16 raw bytes):

- ``{ns}blk:{digest}``   SET of worker ids holding that block
- ``{ns}held:{worker}``  SET of the digests the worker holds (to drop them on restart, clear or death)
- ``{ns}epoch``          HASH worker id → epoch of the incarnation whose entries are stored
- ``{ns}workers``        HASH worker id → JSON ``WorkerInfo`` (role, epoch, block size, load)
- ``{ns}version``        counter bumped by every heartbeat: routers re-read worker records only when it moved
- ``{ns}live``           ZSET worker id → liveness deadline (Redis clock, ms): the heartbeat TTL
- ``{ns}beat``           HASH worker id → time of its last heartbeat (Redis clock, ms)
- ``{ns}flight:{worker}`` HASH request id → ``"{expiry ms}:{placed ms}:{tokens}:{kv tokens}"``: placements in
  flight on it
- ``{ns}flying``         SET of the workers with a ``flight:`` hash, so a match reads only those

Each operation is one server-side Lua script, so a match (the chain's hits and
every live worker's placements in flight) is one round trip whatever the chain
length, and a batch of events is one atomic write. The chain travels as one
blob of concatenated digests. A match asks the holders of the
chain's first block for their whole chain at once (``SMISMEMBER`` on the
worker's held set), so its cost grows with the number of workers that share
the prefix, not with the chain length.

When Redis is unreachable the index answers from its last view of the live
workers with no cached prefixes (placement falls back to load alone), logs one
warning per outage, counts it, and retries with backoff. The workers of that view
still count for a few seconds after Redis is back, as a Redis restarted empty
lists none until they have heartbeat and re-sent what they hold
(``router.index.reporting``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import redis

from engine.block_hash import SCHEME_VERSION
from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent
from router.index.base import Claim, IndexHealth, InFlight, WorkerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Drops every entry of worker ``w`` (the caller sets ``p`` and ``w``).
_DROP_ALL = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function digests(blob)
  local out = {}
  for i = 1, #blob, 16 do out[#out + 1] = string.sub(blob, i, i + 15) end
  return out
end
local function drop_all(p, w)
  local held = p .. 'held:' .. w
  for _, h in ipairs(redis.call('SMEMBERS', held)) do redis.call('SREM', p .. 'blk:' .. h, w) end
  redis.call('DEL', held)
end
-- Placements in flight on worker ``w`` that have not lapsed (lapsed ones are dropped): {count, tokens placed
-- since its last heartbeat, tokens of them all, KV tokens placed since its last heartbeat, KV tokens of them all}.
local function in_flight(p, w, now)
  local key, n, tokens, total, kv, kv_total = p .. 'flight:' .. w, 0, 0, 0, 0, 0
  local beat = tonumber(redis.call('HGET', p .. 'beat', w) or '0')
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    -- a claim written before claims carried KV (pdserve before 2026-12-05) has three parts: no KV
    local expiry, placed, count, held = string.match(entries[i + 1], '^(%d+):(%d+):(%d+):?(%d*)$')
    held = tonumber(held) or 0
    if tonumber(expiry) <= now then
      redis.call('HDEL', key, entries[i])
    else
      n = n + 1
      total = total + tonumber(count)
      kv_total = kv_total + held
      if tonumber(placed) >= beat then
        tokens = tokens + tonumber(count)
        kv = kv + held
      end
    end
  end
  if n == 0 then redis.call('SREM', p .. 'flying', w) end
  return {n, tokens, total, kv, kv_total}
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
for i = 3, #ARGV, 2 do
  local op = ARGV[i]
  if op == 'C' then drop_all(p, w) end
  for _, h in ipairs(digests(ARGV[i + 1])) do
    if op == 'S' then
      redis.call('SADD', p .. 'blk:' .. h, w)
      redis.call('SADD', held, h)
    else
      redis.call('SREM', p .. 'blk:' .. h, w)
      redis.call('SREM', held, h)
    end
  end
end
return 1
"""
)

_HEARTBEAT = (
    _DROP_ALL
    + """
local p, w, epoch, info, ttl_ms = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local known = tonumber(redis.call('HGET', p .. 'epoch', w) or '-1') == epoch
if not advance_epoch(p, w, epoch) then return 2 end
redis.call('HSET', p .. 'workers', w, info)
redis.call('INCR', p .. 'version')
local now = now_ms()
redis.call('ZADD', p .. 'live', now + ttl_ms, w)
redis.call('HSET', p .. 'beat', w, now)
if known then return 2 end
return 1
"""
)

_MATCH = (
    _DROP_ALL
    + """
local p, chain, known_version = KEYS[1], digests(ARGV[1]), ARGV[2]
local version = redis.call('GET', p .. 'version') or '0'
local now = now_ms()
local live = redis.call('ZRANGEBYSCORE', p .. 'live', now, '+inf')
local infos = {}
if version ~= known_version then infos = redis.call('HGETALL', p .. 'workers') end
local counts = {}
if #chain > 0 and #live > 0 then
  local first = redis.call('SMISMEMBER', p .. 'blk:' .. chain[1], unpack(live))
  for k = 1, #live do
    if first[k] == 1 then
      local n, done = 0, false
      for start = 1, #chain, 4096 do  -- unpack() takes a bounded number of values
        local stop = math.min(start + 4095, #chain)
        local hits = redis.call('SMISMEMBER', p .. 'held:' .. live[k], unpack(chain, start, stop))
        for i = 1, #hits do
          if hits[i] ~= 1 then done = true break end
          n = n + 1
        end
        if done then break end
      end
      counts[#counts + 1] = live[k]
      counts[#counts + 1] = n
    end
  end
end
local flights = {}
if #live > 0 and redis.call('SCARD', p .. 'flying') > 0 then
  local flying = redis.call('SMISMEMBER', p .. 'flying', unpack(live))
  for k = 1, #live do
    if flying[k] == 1 then
      local figures = in_flight(p, live[k], now)
      if figures[1] > 0 then
        flights[#flights + 1] = live[k]
        flights[#flights + 1] = figures[1]
        flights[#flights + 1] = figures[2]
        flights[#flights + 1] = figures[3]
        flights[#flights + 1] = figures[4]
        flights[#flights + 1] = figures[5]
      end
    end
  end
end
return {version, live, infos, counts, flights}
"""
)

_RESERVE = (
    _DROP_ALL
    + """
local p, now = KEYS[1], now_ms()
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local key, request = p .. 'flight:' .. ARGV[i], ARGV[i + 1]
  local known = redis.call('HGET', key, request)
  local placed = known and string.match(known, '^%d+:(%d+):') or now  -- a renewal keeps its placing time
  redis.call('HSET', key, request, expiry .. ':' .. placed .. ':' .. ARGV[i + 2] .. ':' .. ARGV[i + 3])
  redis.call('SADD', p .. 'flying', ARGV[i])
end
return 1
"""
)

_FORGET = (
    _DROP_ALL
    + """
local p, w = KEYS[1], ARGV[1]
drop_all(p, w)
redis.call('HDEL', p .. 'workers', w)
redis.call('HDEL', p .. 'epoch', w)
redis.call('ZREM', p .. 'live', w)
redis.call('DEL', p .. 'flight:' .. w)
redis.call('SREM', p .. 'flying', w)
redis.call('HDEL', p .. 'beat', w)
return 1
"""
)

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
_MAX_BACKOFF_S = 2.0
# A Redis back from an outage may have restarted empty: the workers of the last view that it does
# not list yet still count this long, while their heartbeats (and re-sent blocks) fill it again.
_RESTART_GRACE_S = 5.0


class RedisPrefixIndex:
    network_io = True

    def __init__(self, url: str, model_id: str, timeout_s: float = 0.5):
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._ns = f"pdserve:v{SCHEME_VERSION}:{model_id}:"
        self._apply = self._client.register_script(_APPLY)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._match = self._client.register_script(_MATCH)
        self._forget = self._client.register_script(_FORGET)
        self._reserve = self._client.register_script(_RESERVE)
        self._last_live: list[WorkerInfo] = []
        self._workers: dict[str, WorkerInfo] = {}  # decoded worker records as of ``_version``
        self._version = b""
        self._available = True
        self._outages = 0
        self._failed_calls = 0
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._back_at = -_RESTART_GRACE_S

    @property
    def namespace(self) -> str:
        return self._ns

    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        args: list[str | int | bytes] = [worker_id, epoch]
        for event in events:
            if isinstance(event, BlocksStored):
                args += ["S", b"".join(event.hashes)]
            elif isinstance(event, BlocksRemoved):
                args += ["R", b"".join(event.hashes)]
            elif isinstance(event, AllCleared):
                args += ["C", b""]
        self._guard(lambda: self._apply(keys=[self._ns], args=args), None)

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> bool | None:
        info = json.dumps(worker.to_dict())
        ttl_ms = max(1, int(ttl_s * 1000))
        answer = self._guard(
            lambda: self._heartbeat(keys=[self._ns], args=[worker.worker_id, worker.epoch, info, ttl_ms]), None
        )
        return None if answer is None else answer == 2

    def match(self, chain: Sequence[bytes]) -> tuple[list[WorkerInfo], dict[str, int]]:
        def call():
            version, live_ids, infos, flat, flights = self._match(
                keys=[self._ns], args=[b"".join(chain), self._version]
            )
            if infos:
                self._workers = {
                    infos[i].decode(): WorkerInfo.from_dict(json.loads(infos[i + 1])) for i in range(0, len(infos), 2)
                }
                self._version = version
            in_flight = {flights[i].decode(): InFlight(*flights[i + 1 : i + 6]) for i in range(0, len(flights), 6)}
            live = [
                replace(self._workers[w], in_flight=in_flight[w]) if w in in_flight else self._workers[w]
                for w in map(bytes.decode, live_ids)
                if w in self._workers
            ]
            if not self._available or time.monotonic() - self._back_at < _RESTART_GRACE_S:
                seen = {w.worker_id for w in live}  # back from an outage: those not heard from yet still count
                live += [w for w in self._last_live if w.worker_id not in seen]
            counts = dict.fromkeys((w.worker_id for w in live), 0)
            for i in range(0, len(flat), 2):
                counts[flat[i].decode()] = int(flat[i + 1])
            self._last_live = live
            return live, counts

        return self._guard(call, (self._last_live, dict.fromkeys((w.worker_id for w in self._last_live), 0)))

    def reserve(self, claims: Sequence[Claim], ttl_s: float) -> None:
        args: list[str | int] = [max(1, int(ttl_s * 1000))]
        for claim in claims:
            args += [claim.worker_id, claim.request_id, claim.tokens, claim.kv_tokens]
        if claims:
            self._guard(lambda: self._reserve(keys=[self._ns], args=args), None)

    def release(self, claims: Sequence[Claim]) -> None:
        def call() -> None:
            pipe = self._client.pipeline(transaction=False)
            for claim in claims:
                pipe.hdel(self._ns + "flight:" + claim.worker_id, claim.request_id)
            pipe.execute()

        if claims:
            self._guard(call, None)

    def live_workers(self) -> list[WorkerInfo]:
        return self.match([])[0]

    def held_blocks(self) -> dict[str, int]:
        def call() -> dict[str, int]:
            workers = sorted(w.decode() for w in self._client.hkeys(self._ns + "epoch"))
            pipe = self._client.pipeline(transaction=False)
            for worker_id in workers:
                pipe.scard(self._ns + "held:" + worker_id)
            return dict(zip(workers, pipe.execute(), strict=True))

        return self._guard(call, {})

    def forget_worker(self, worker_id: str) -> None:
        self._guard(lambda: self._forget(keys=[self._ns], args=[worker_id]), None)

    def sweep(self) -> int:
        def call() -> int:
            seconds, micros = self._client.time()
            pipe = self._client.pipeline(transaction=False)
            pipe.hkeys(self._ns + "epoch")
            pipe.zrangebyscore(self._ns + "live", seconds * 1000 + micros // 1000, "+inf")
            known, live = pipe.execute()
            dead = sorted({w.decode() for w in known} - {w.decode() for w in live})
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
            self._back_at = time.monotonic()
            self._backoff_s = 0.0
            log.info("prefix index reachable again after %d failed calls", self._failed_calls)
        return result
