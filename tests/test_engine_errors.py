"""The engine layer's typed errors cross process boundaries (a spawned engine process, Ray) whole."""

from __future__ import annotations

import pickle

import pytest

from engine.errors import EngineConfigError, EngineInputError


@pytest.mark.parametrize(
    "error", [EngineConfigError("engine.cpu_cores", "core 7 is not on this node"),
              EngineInputError("max_tokens", "must be at least 1", "req-1")],
)  # fmt: skip
def test_an_engine_error_unpickles_with_its_field_and_message(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and again.field == error.field and str(again) == str(error)
