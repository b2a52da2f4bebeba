"""grpcio's fork handlers, off in pdserve's processes before anything imports grpc.

Ray starts a local cluster's daemons with ``Popen(preexec_fn=...)`` (Ray 2.60, ``ray._private.services``), a
plain fork() that runs grpcio's fork handlers. When another thread of the forking process is inside gRPC at
that moment (a benchmark's clients from the service it just stopped, a test's server), the child dies
(SIGABRT) or hangs before exec, and ``ray.init`` fails with "The current node timed out during startup" or
"Timed out waiting for file .../gcs_server_port_..." (reproduced with grpcio 1.85: 2 failed starts in 20 beside
gRPC traffic, none in 30 with the handlers off). Benchmarks start several local clusters in one process, the
test suite dozens. No pdserve process forks without exec and then uses gRPC (vLLM is told to spawn its engine
core and workers, engine/vllm_args.py; pdserve spawns its own children), so the handlers have nothing to protect.
grpcio reads the setting when it is first imported; a value the environment gives is kept.
"""

from __future__ import annotations

import os


def turn_off_grpc_fork_handlers() -> None:
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
