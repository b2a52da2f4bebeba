"""One conformance suite for every PrefixIndex backend, then what only Redis must do."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from engine.block_hash import SCHEME_VERSION, hash_chain
from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored
from pdserve.local_redis import LocalRedis, RedisServerError
from router.index import Claim, InFlight, MemoryPrefixIndex, WorkerInfo, WorkerLoad, make_index
from router.index.redis_index import RedisPrefixIndex

MODEL = "tiny"
BLOCK = 16
TTL = 5.0
CHAIN = hash_chain(MODEL, list(range(8 * BLOCK)), BLOCK)
OTHER = hash_chain(MODEL, list(range(1000, 1000 + 4 * BLOCK)), BLOCK)


def worker(worker_id: str, role="decode", epoch=1, **load) -> WorkerInfo:
    return WorkerInfo(worker_id, role, epoch, BLOCK, WorkerLoad(**load))


def stored(hashes, parent=None) -> BlocksStored:
    return BlocksStored(list(hashes), parent)


@pytest.fixture(params=["memory", "redis"])
def index(request, tmp_path):
    if request.param == "memory":
        yield MemoryPrefixIndex()
        return
    server = LocalRedis(tmp_path).start()
    index = make_index(server.url, MODEL)
    yield index
    index.close()
    server.stop()


def live(index, worker_id: str, **kwargs) -> None:
    index.heartbeat(worker(worker_id, **kwargs), TTL)


def test_match_counts_the_leading_blocks_each_live_worker_holds(index):
    live(index, "a")
    live(index, "b")
    live(index, "c")
    index.apply_events("a", 1, [stored(CHAIN[:5])])
    index.apply_events("b", 1, [stored(CHAIN[:2]), stored(CHAIN[2:3], CHAIN[1])])
    workers, counts = index.match(CHAIN)
    assert {w.worker_id for w in workers} == {"a", "b", "c"}
    assert counts == {"a": 5, "b": 3, "c": 0}


def test_held_blocks_counts_each_workers_entries(index):
    live(index, "a")
    live(index, "b")
    index.apply_events("a", 1, [stored(CHAIN[:5])])
    index.apply_events("b", 1, [stored(CHAIN[:2]), BlocksRemoved([CHAIN[1]])])
    assert index.held_blocks() == {"a": 5, "b": 1}
    index.forget_worker("a")
    assert index.held_blocks() == {"b": 1}


def test_a_missing_block_ends_the_match(index):
    live(index, "a")
    index.apply_events("a", 1, [stored(CHAIN[:2]), stored(CHAIN[3:6])])
    assert index.match(CHAIN)[1] == {"a": 2}


def test_an_empty_chain_lists_live_workers_with_no_blocks(index):
    live(index, "a", queued_prefill_tokens=7)
    workers, counts = index.match([])
    assert workers == [worker("a", queued_prefill_tokens=7)] and workers[0].in_flight == InFlight()
    assert counts == {"a": 0}


def test_removed_blocks_stop_matching(index):
    live(index, "a")
    index.apply_events("a", 1, [stored(CHAIN[:6])])
    index.apply_events("a", 1, [BlocksRemoved([CHAIN[3]])])
    assert index.match(CHAIN)[1] == {"a": 3}


def test_cleared_drops_every_block_of_that_worker_only(index):
    live(index, "a")
    live(index, "b")
    index.apply_events("a", 1, [stored(CHAIN[:4])])
    index.apply_events("b", 1, [stored(CHAIN[:4])])
    index.apply_events("a", 1, [AllCleared(), stored(OTHER[:1])])
    assert index.match(CHAIN)[1] == {"a": 0, "b": 4}
    assert index.match(OTHER)[1] == {"a": 1, "b": 0}


def test_workers_without_a_heartbeat_do_not_count(index):
    index.apply_events("ghost", 1, [stored(CHAIN)])
    assert index.match(CHAIN) == ([], {})


def test_a_lapsed_heartbeat_stops_counting_at_once(index):
    index.heartbeat(worker("a"), 0.5)
    live(index, "b")
    index.apply_events("a", 1, [stored(CHAIN)])
    assert index.match(CHAIN)[1]["a"] == 8
    time.sleep(0.8)
    workers, counts = index.match(CHAIN)
    assert [w.worker_id for w in workers] == ["b"] and "a" not in counts


def test_heartbeats_carry_role_and_load(index):
    live(index, "p", role="prefill", queued_prefill_tokens=300)
    live(index, "d", role="decode", running_seqs=3, kv_used_fraction=0.5)
    by_id = {w.worker_id: w for w in index.live_workers()}
    assert by_id["p"].role == "prefill" and by_id["p"].load.queued_prefill_tokens == 300
    assert by_id["d"].load == WorkerLoad(running_seqs=3, kv_used_fraction=0.5)


def test_a_restart_with_a_new_epoch_drops_the_old_entries(index):
    live(index, "a", epoch=1)
    index.apply_events("a", 1, [stored(CHAIN)])
    live(index, "a", epoch=2)
    assert index.match(CHAIN)[1] == {"a": 0}
    index.apply_events("a", 2, [stored(CHAIN[:2])])
    assert index.match(CHAIN)[1] == {"a": 2}


def test_events_and_heartbeats_from_an_older_epoch_are_ignored(index):
    live(index, "a", epoch=2)
    index.apply_events("a", 1, [stored(CHAIN)])
    index.heartbeat(worker("a", epoch=1, running_seqs=99), TTL)
    assert index.match(CHAIN)[1] == {"a": 0}
    assert index.live_workers()[0].epoch == 2


def test_forget_worker_drops_it_and_its_entries(index):
    live(index, "a")
    live(index, "b")
    index.apply_events("a", 1, [stored(CHAIN)])
    index.forget_worker("a")
    assert index.match(CHAIN)[1] == {"b": 0}
    live(index, "a")
    assert index.match(CHAIN)[1]["a"] == 0


def test_sweep_collects_the_entries_of_dead_workers(index):
    index.heartbeat(worker("a"), 0.5)
    live(index, "b")
    index.apply_events("a", 1, [stored(CHAIN)])
    index.apply_events("b", 1, [stored(CHAIN[:1])])
    time.sleep(0.8)
    assert index.sweep() == 1
    live(index, "a")  # the same id comes back with the same epoch: nothing of the old entries remains
    assert index.match(CHAIN)[1] == {"a": 0, "b": 1}
    assert index.sweep() == 0


def in_flight(index) -> dict[str, InFlight]:
    return {w.worker_id: w.in_flight for w in index.match(CHAIN)[0]}


def test_reserved_placements_count_in_flight_on_their_workers_until_released(index):
    live(index, "p", role="prefill")
    live(index, "d")
    index.reserve([Claim("r1", "p", 100), Claim("r1", "d"), Claim("r2", "p", 30)], TTL)
    assert in_flight(index) == {"p": InFlight(2, 130, 130), "d": InFlight(1, 0, 0)}
    index.release([Claim("r1", "p", 100)])
    assert in_flight(index) == {"p": InFlight(1, 30, 30), "d": InFlight(1, 0, 0)}
    index.release([Claim("r2", "p"), Claim("r1", "d"), Claim("never", "d")])
    assert in_flight(index) == {"p": InFlight(), "d": InFlight()}


def test_tokens_placed_before_the_workers_last_heartbeat_are_in_its_own_figures_and_still_in_flight(index):
    live(index, "p", role="prefill")
    index.reserve([Claim("old", "p", 100)], TTL)
    time.sleep(0.01)
    live(index, "p", role="prefill", queued_prefill_tokens=100)
    time.sleep(0.01)
    index.reserve([Claim("new", "p", 40), Claim("old", "p", 100)], TTL)  # renewing keeps the placing time
    assert in_flight(index) == {"p": InFlight(requests=2, unreported_tokens=40, tokens=140)}


def test_a_decode_claims_kv_counts_in_flight_and_since_the_workers_last_heartbeat_apart(index):
    live(index, "d")
    index.reserve([Claim("old", "d", kv_tokens=2000)], TTL)  # its KV shipped: nothing to compute there
    time.sleep(0.01)
    live(index, "d", kv_used_fraction=0.3, kv_pool_tokens=6144)
    time.sleep(0.01)
    index.reserve([Claim("local", "d", 300, kv_tokens=300), Claim("old", "d", kv_tokens=2000)], TTL)
    assert in_flight(index) == {
        "d": InFlight(requests=2, unreported_tokens=300, tokens=300, unreported_kv_tokens=300, kv_tokens=2300)
    }
    assert index.match(CHAIN)[0][0].load.kv_pool_tokens == 6144


def test_a_reservation_nobody_renews_lapses_after_its_ttl(index):
    live(index, "p", role="prefill")
    index.reserve([Claim("short", "p", 10)], 0.3)
    index.reserve([Claim("renewed", "p", 5)], 0.3)
    time.sleep(0.2)
    index.reserve([Claim("renewed", "p", 5)], 0.3)
    time.sleep(0.2)
    assert in_flight(index) == {"p": InFlight(1, 5, 5)}


def test_forgetting_a_worker_drops_its_reservations(index):
    live(index, "p", role="prefill")
    index.reserve([Claim("r", "p", 10)], TTL)
    index.forget_worker("p")
    live(index, "p", role="prefill")
    assert in_flight(index) == {"p": InFlight()}


def test_health_reports_available(index):
    health = index.health()
    assert health.available and health.outages == 0


# ----- Redis only ---------------------------------------------------------------------------


def test_redis_match_is_one_round_trip_whatever_the_chain_length(redis_server, monkeypatch):
    index = RedisPrefixIndex(redis_server.url, MODEL)
    long_chain = hash_chain(MODEL, list(range(4096)), BLOCK)
    for i in range(8):
        index.heartbeat(worker(f"w{i}"), TTL)
        index.apply_events(f"w{i}", 1, [stored(long_chain[: 32 * i])])
    index.match(long_chain)  # loads the script once
    sent = []
    original = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(
        redis.connection.Connection,
        "send_packed_command",
        lambda self, *a, **k: sent.append(1) or original(self, *a, **k),
    )
    counts = index.match(long_chain)[1]
    assert len(sent) == 1
    assert counts == {f"w{i}": 32 * i for i in range(8)}


def test_redis_routers_sharing_the_index_see_each_others_reservations(redis_server):
    first, second = RedisPrefixIndex(redis_server.url, MODEL), RedisPrefixIndex(redis_server.url, MODEL)
    first.heartbeat(worker("p", role="prefill"), TTL)
    first.reserve([Claim("r", "p", 64)], TTL)
    assert [w.in_flight for w in second.match(CHAIN)[0]] == [InFlight(1, 64, 64)]


def test_redis_reads_a_claim_written_before_claims_carried_kv_as_holding_none(redis_server):
    index = RedisPrefixIndex(redis_server.url, MODEL)
    index.heartbeat(worker("d"), TTL)
    key, client = f"pdserve:v{SCHEME_VERSION}:{MODEL}:", redis.Redis.from_url(redis_server.url)
    expiry = int(time.time() * 1000) + 60_000  # Redis's clock is this machine's
    client.hset(key + "flight:d", "older-router", f"{expiry}:0:40")  # a router of the previous format
    client.sadd(key + "flying", "d")
    assert in_flight(index) == {"d": InFlight(requests=1, unreported_tokens=0, tokens=40)}


def test_redis_keys_carry_the_scheme_version_and_model(redis_server):
    a, b = RedisPrefixIndex(redis_server.url, "model-a"), RedisPrefixIndex(redis_server.url, "model-b")
    a.heartbeat(worker("w"), TTL)
    a.apply_events("w", 1, [stored(CHAIN)])
    assert b.match(CHAIN) == ([], {})
    client = redis.Redis.from_url(redis_server.url)
    assert {k.split(b":blk:")[0] for k in client.keys("*blk:*")} == {b"pdserve:v1:model-a"}


@pytest.mark.parametrize(
    "options",
    [
        dict(password="s3cret"),
        dict(password="s3cret", user="pdserve"),
        dict(unix=True, password="pw"),
        dict(tls=True, password="pw"),
    ],
    ids=["password", "acl-user", "unix-socket", "rediss"],
)
def test_redis_urls_with_auth_tls_and_unix_sockets_work(tmp_path, options):
    server = LocalRedis(tmp_path, **options).start()
    try:
        index = RedisPrefixIndex(server.url, MODEL)
        index.heartbeat(worker("a"), TTL)
        index.apply_events("a", 1, [stored(CHAIN[:3])])
        assert index.match(CHAIN)[1] == {"a": 3}
        assert index.health().available
    finally:
        server.stop()


def test_redis_with_a_wrong_password_counts_as_unavailable(tmp_path):
    server = LocalRedis(tmp_path, password="right").start()
    try:
        index = RedisPrefixIndex(server.url.replace("right", "wrong"), MODEL)
        with pytest.raises(redis.AuthenticationError):
            index.match(CHAIN)
    finally:
        server.stop()


def test_redis_outage_falls_back_to_load_alone_and_recovers(redis_server, caplog):
    index = RedisPrefixIndex(redis_server.url, MODEL, timeout_s=0.2)
    index.heartbeat(worker("a", queued_prefill_tokens=5), TTL)
    index.apply_events("a", 1, [stored(CHAIN)])
    assert index.match(CHAIN)[1] == {"a": 8}

    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="router.index.redis_index"):
        for _ in range(20):
            workers, counts = index.match(CHAIN)
            # The last view of the live workers, with no cached prefix: placement on load alone.
            assert [w.worker_id for w in workers] == ["a"] and counts == {"a": 0}
            index.apply_events("a", 1, [stored(OTHER)])
            time.sleep(0.02)
    health = index.health()
    assert not health.available and health.outages == 1 and health.failed_calls >= 20
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1

    redis_server.start()  # same port, empty: a restarted Redis
    deadline = time.monotonic() + 10
    while not index.health().available:
        assert time.monotonic() < deadline, "the index did not come back within 10 s"
        workers, counts = index.match(CHAIN)
        time.sleep(0.1)
    # No worker has heartbeat into the new Redis yet: the last view stands (none would mean no decode worker).
    assert [w.worker_id for w in index.match(CHAIN)[0]] == ["a"]
    while index.match(CHAIN)[1] != {"a": 4}:
        assert time.monotonic() < deadline, "the index did not come back within 10 s"
        index.heartbeat(worker("a"), TTL)
        index.apply_events("a", 1, [stored(CHAIN[:4])])
        time.sleep(0.1)
    assert index.health().outages == 1


def test_a_heartbeat_says_whether_the_index_knew_this_incarnation(index):
    assert index.heartbeat(worker("a"), TTL) is False  # new to the index
    assert index.heartbeat(worker("a"), TTL) is True
    index.forget_worker("a")
    assert index.heartbeat(worker("a"), TTL) is False  # forgotten while alive: it must re-send what it holds
    assert index.heartbeat(worker("a", epoch=2), TTL) is False  # a restart
    assert index.heartbeat(worker("a", epoch=1), TTL) is True  # an old incarnation: nothing to re-send


def test_a_worker_resends_what_it_holds_to_a_redis_restarted_empty(redis_server):
    from router.index.reporting import IndexReporter

    reporter = IndexReporter(worker("a"), TTL, index=RedisPrefixIndex(redis_server.url, MODEL, timeout_s=0.2))
    reader = RedisPrefixIndex(redis_server.url, MODEL, timeout_s=0.2)
    reporter.report_load(WorkerLoad())
    reporter.report_events([stored(CHAIN), stored(OTHER), BlocksRemoved(CHAIN[6:])])
    assert reader.match(CHAIN)[1] == {"a": 6}
    redis_server.stop()
    reporter.report_events([BlocksRemoved(CHAIN[4:6])])  # lost with Redis away
    reporter.report_load(WorkerLoad())
    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 5
    while reader.match(CHAIN)[1] != {"a": 4}:
        assert time.monotonic() < deadline, f"the index was not repaired: {reader.match(CHAIN)}"
        reporter.report_load(WorkerLoad())
        time.sleep(0.1)
    assert reader.match(OTHER)[1] == {"a": len(OTHER)}


def test_a_worker_resends_the_events_an_outage_lost_when_redis_comes_back_with_its_data(redis_server):
    from router.index.reporting import IndexReporter

    reporter = IndexReporter(worker("a"), TTL, index=RedisPrefixIndex(redis_server.url, MODEL, timeout_s=0.2))
    reader = RedisPrefixIndex(redis_server.url, MODEL, timeout_s=0.2)
    reporter.report_load(WorkerLoad())
    reporter.report_events([stored(CHAIN)])
    redis_server.pause()
    reporter.report_events([BlocksRemoved(CHAIN[2:])])  # lost: Redis does not answer
    redis_server.resume()
    deadline = time.monotonic() + 5
    while reader.match(CHAIN)[1] != {"a": 2}:
        assert time.monotonic() < deadline, f"the lost removal never reached the index: {reader.match(CHAIN)}"
        reporter.report_load(WorkerLoad())
        time.sleep(0.1)


def test_the_background_sweeper_collects_dead_workers(index):
    from router.index.sweeper import IndexSweeper

    index.heartbeat(worker("a"), 0.1)
    index.apply_events("a", 1, [stored(CHAIN)])
    sweeper = IndexSweeper(index, interval_s=0.05).start()
    try:
        deadline = time.monotonic() + 3
        while sweeper.collected == 0:
            assert time.monotonic() < deadline, "the sweeper collected nothing in 3 s"
            time.sleep(0.02)
    finally:
        sweeper.stop()
    live(index, "a")
    assert index.match(CHAIN)[1] == {"a": 0}


def test_a_local_redis_makes_its_directory_and_says_why_it_could_not_start(tmp_path):
    LocalRedis(tmp_path / "not" / "made" / "yet").start().stop()
    too_long = LocalRedis(tmp_path / ("x" * 120), unix=True)  # a unix socket path over the kernel's 108 bytes
    with pytest.raises(RedisServerError, match="redis-server exited"):
        too_long.start()
