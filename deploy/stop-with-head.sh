#!/usr/bin/env bash
# A worker's Ray stops when the head's does (worker_start_ray_commands, after `ray start`). On a cloud,
# `ray down` terminates the worker machines; with Ray's local (on-premises) provider it stops Ray on the
# head only (Ray 2.60), and a worker's raylet waits for a GCS that is gone, engines and all. This watcher
# ends that: once the head's GCS port has refused connections for 30 s in a row, `ray stop` here. It
# exits with the node's raylet, however that stops.
set -euo pipefail
: "${RAY_HEAD_IP:?the launcher exports RAY_HEAD_IP on workers}"
nohup setsid bash -c '
  misses=0
  while pgrep -x raylet >/dev/null; do
    if timeout 2 bash -c "</dev/tcp/$RAY_HEAD_IP/6379" 2>/dev/null; then misses=0; else misses=$((misses + 1)); fi
    if [ "$misses" -ge 30 ]; then exec ray stop --force; fi
    sleep 1
  done
' >/dev/null 2>&1 < /dev/null &
