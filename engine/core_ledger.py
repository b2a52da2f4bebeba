"""Which cores of this node each engine binds, kept in a ledger on local disk, so engines never share one by accident.

vLLM's CPU engine binds one OpenMP thread per core it is given
(``VLLM_CPU_OMP_THREADS_BIND``) and spins on them. Two engines bound to one core,
or an engine bound to the core the serving processes run on, cost far more than
the core's share: the figures are in README ("Cores on CPU nodes"). Every
replica of every pool on a node claims its own cores here when it starts (replica
k of a pool does not land on replica 0's cores) and they are free again when its
process is gone. A claim names its process by pid and start time: pids come round
again (32768 of them by default), and a claim must not outlive its engine in
whatever process takes its pid next. The lowest ``reserved`` cores are never claimed: Ray, the Serve
proxy, the router and the replicas' own processes run there, as vLLM's server
keeps one core for its front end.

A request carries the node's cores as ``pdserve up`` saw them: a replica's own
process may be confined to the reserved core (pdserve/up.py), and the cores it
may bind are the node's, not its own affinity.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PATH = Path(tempfile.gettempdir()) / f"pdserve-cores-{os.getuid()}.json"


@dataclass(frozen=True)
class CoreRequest:
    """What a replica asks for: ``per_rank`` cores for each of ``ranks`` ranks, of the ``node_cores`` above the
    lowest ``reserved`` ones."""

    per_rank: int
    node_cores: tuple[int, ...]
    ranks: int = 1
    reserved: int = 1

    @property
    def engine_cores(self) -> list[int]:
        """The node's cores an engine may bind: all but the reserved ones."""
        return sorted(self.node_cores)[self.reserved :]


def omp_bind(cores_by_rank: list[list[int]]) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND``: ranks separated by '|', each a list of spans ('0-1|2-3')."""
    return "|".join(",".join(_spans(cores)) for cores in cores_by_rank)


def bound_cores(bind: str) -> list[int]:
    """The cores a ``VLLM_CPU_OMP_THREADS_BIND`` value names, all ranks together ('0-1|3' → [0, 1, 3])."""
    cores: list[int] = []
    for rank in bind.split("|"):
        for part in rank.split(","):
            first, _, last = part.partition("-")
            cores.extend(range(int(first), int(last or first) + 1))
    return cores


class CoreLedger:
    def __init__(self, path: Path = DEFAULT_PATH):
        self._path = path

    def claim(self, owner_pid: int, request: CoreRequest) -> str | None:
        """Cores for ``owner_pid``'s engine as a bind string, or None when this node has too few free ones."""
        with self._locked() as claims:
            taken = {core for claim in claims.values() for core in claim["cores"]}
            free = [c for c in request.engine_cores if c not in taken]
            want = request.per_rank * request.ranks
            if want < 1 or len(free) < want:
                return None
            mine = free[:want]
            claims[str(owner_pid)] = {"started": _start_time(owner_pid), "cores": mine}
        return omp_bind([mine[r * request.per_rank : (r + 1) * request.per_rank] for r in range(request.ranks)])

    def release(self, owner_pid: int) -> None:
        with self._locked() as claims:
            claims.pop(str(owner_pid), None)

    def claims(self) -> dict[int, list[int]]:
        with self._locked() as claims:
            return {int(pid): claim["cores"] for pid, claim in claims.items()}

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        """The live claims, under the node-wide lock, written back when the block ends."""
        with open(self._path, "a+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                file.seek(0)
                loaded = self._read(file.read())
                # A claim whose process is gone (exited, killed, its pid since taken by another) is free again.
                claims = {pid: claim for pid, claim in loaded.items() if _alive(int(pid), claim)}
                yield claims
                file.seek(0)
                file.truncate()
                json.dump(claims, file)
                file.flush()  # on disk before the lock goes: buffered, it landed after the next holder's write
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)

    def _read(self, text: str) -> dict[str, dict]:
        """The claims written; an unreadable ledger (a writer killed mid-write) would fail every replica of the
        node from then on, so it starts afresh, with a warning: engines may share a core until it is rebuilt."""
        try:
            loaded = json.loads(text) if text.strip() else {}
            if not isinstance(loaded, dict):
                raise ValueError(f"a {type(loaded).__name__}, not an object")
            return loaded
        except ValueError as exc:
            log.warning("core ledger %s unreadable (%s), started afresh: %r", self._path, exc, text[:200])
            return {}


def _alive(pid: int, claim: object) -> bool:
    """Whether the process that made ``claim`` still runs: its pid, started when the claim says."""
    started = _start_time(pid)
    return started is not None and isinstance(claim, dict) and claim.get("started") == started


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (``/proc/PID/stat`` field 22); None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rpartition(")")[2].split()[19])  # fields after the command's name, which may hold spaces


def _spans(cores: list[int]) -> list[str]:
    spans: list[str] = []
    for core in cores:
        if spans and core == int(spans[-1].rpartition("-")[2]) + 1:
            spans[-1] = f"{spans[-1].partition('-')[0]}-{core}"
        else:
            spans.append(str(core))
    return spans
