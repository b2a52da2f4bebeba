"""The engine a worker runs, by ``engine.kind``: vLLM, or the simulated engine (engine/sim/)."""

from __future__ import annotations

from collections.abc import Callable

from engine.cache_events import CacheEvent
from engine.config import EngineConfig


def build_engine(config: EngineConfig, on_cache_events: Callable[[list[CacheEvent]], None] | None = None):
    """``engine.engine.Engine`` or ``engine.sim.engine.SimulatedEngine``: the same surface to the workers."""
    if config.kind == "simulated":
        from engine.sim.engine import SimulatedEngine

        return SimulatedEngine(config, on_cache_events=on_cache_events)
    from engine.engine import Engine

    return Engine(config, on_cache_events=on_cache_events)
