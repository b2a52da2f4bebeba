"""``pdserve up`` compares the pools' KV fingerprints once their workers run, and refuses pools that differ."""

from __future__ import annotations

import pytest
import ray
from service_client import service_config

from pdserve.up import start

pytestmark = pytest.mark.service


def test_pools_whose_kv_turns_out_to_differ_are_refused_at_start_naming_both(model_dir, tmp_path):
    # float32 against "auto": the config cannot tell they differ (auto is bfloat16 on this CPU), the workers can
    overrides = {"service.decode.engine": {"dtype": "auto"}}
    with pytest.raises(RuntimeError, match="not interchangeable") as refused:
        start(service_config(model_dir, tmp_path / "cache", **overrides))
    message = str(refused.value)
    assert "dtype: 'float32' != 'bfloat16'" in message
    assert "prefill KVFingerprint(" in message and "decode KVFingerprint(" in message
    assert not ray.is_initialized()  # nothing left running
