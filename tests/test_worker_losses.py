"""What /health calls a degraded pool: a worker death no replacement has made good yet."""

from __future__ import annotations

import time

from router.index import WorkerInfo
from router.worker_losses import WorkerLosses


def workers(role: str, *ids: str) -> list[WorkerInfo]:
    return [WorkerInfo(worker_id=i, role=role, epoch=1, block_size=32) for i in ids]


def test_a_death_is_recorded_once_however_many_requests_see_it():
    losses = WorkerLosses()
    assert losses.record("decode", "a", ["a", "b"])
    assert not losses.record("decode", "a", ["b"])
    assert [loss.worker_id for loss in losses.unreplaced(workers("decode", "b"))] == ["a"]


def test_a_new_worker_of_the_same_pool_makes_one_loss_good():
    losses = WorkerLosses()
    losses.record("decode", "a", ["a", "b"])
    losses.record("decode", "b", ["b"])
    assert len(losses.unreplaced(workers("prefill", "p2"))) == 2  # another pool's newcomer replaces nothing
    assert [loss.worker_id for loss in losses.unreplaced(workers("decode", "c"))] == ["b"]
    assert losses.unreplaced(workers("decode", "c", "d")) == []


def test_a_loss_nobody_replaces_is_forgotten_after_its_time():
    losses = WorkerLosses(forget_after_s=0.05)
    losses.record("prefill", "p", ["p"])
    assert losses.unreplaced([])
    time.sleep(0.1)
    assert losses.unreplaced([]) == []
