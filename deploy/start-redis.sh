#!/usr/bin/env bash
# The prefix index every router replica shares, on the head (head_start_ray_commands of
# deploy/cluster-*.yaml, before `ray start`): redis-server on the head's private address only, port 6380
# (Ray's GCS has 6379), requiring the password `ray up` copied to ~/.pdserve/redis-password from where
# you ran it. The Serve configs reach it as redis://${RAY_HEAD_IP}:6380/1 with that password file.
# It lives as long as the head's Ray: a watcher stops it once Ray's GCS is gone, so `ray stop` and
# `ray down` leave nothing running.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

password_file="$HOME/.pdserve/redis-password"
if [ ! -s "$password_file" ]; then
  echo "start-redis: $password_file is missing or empty; make it where you run ray up:" >&2
  echo "  mkdir -p ~/.pdserve && (umask 077; openssl rand -hex 32 > ~/.pdserve/redis-password)" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
fi
ip=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')
dir="$HOME/.pdserve/redis"
mkdir -p "$dir"
chmod 700 "$HOME/.pdserve" "$dir"

if [ -s "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
  kill "$(cat "$dir/redis.pid")"  # a second `ray up` restarts it with the current password
  for _ in $(seq 50); do kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null || break; sleep 0.1; done
fi
(
  umask 077
  cat > "$dir/redis.conf" <<CONF
bind $ip
port 6380
protected-mode yes
requirepass $(cat "$password_file")
daemonize yes
dir $dir
pidfile $dir/redis.pid
logfile $dir/redis.log
save ""
appendonly no
CONF
)
redis-server "$dir/redis.conf"
for _ in $(seq 50); do [ -s "$dir/redis.pid" ] && break; sleep 0.1; done
redis_pid=$(cat "$dir/redis.pid")

# The watcher: waits (5 min at most) for the GCS `ray start` brings up next, then for it to go.
nohup setsid bash -c '
  for _ in $(seq 600); do pgrep -x gcs_server >/dev/null && break; sleep 0.5; done
  while pgrep -x gcs_server >/dev/null; do sleep 1; done
  kill "$0" 2>/dev/null
' "$redis_pid" >/dev/null 2>&1 < /dev/null &
