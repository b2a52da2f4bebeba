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
password=$(cat "$password_file" 2>/dev/null || true)
if ! [[ "$password" =~ ^[A-Za-z0-9]{16,}$ ]]; then  # it goes into redis.conf, and into URLs as it is
  echo "start-redis: $password_file must hold 16 or more letters and digits; make it where you run ray up:" >&2
  echo "  mkdir -p ~/.pdserve && (umask 077; openssl rand -hex 32 > ~/.pdserve/redis-password)" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
  # Debian starts its own server on 127.0.0.1:6379, Ray's GCS port: not wanted here.
  if command -v systemctl >/dev/null 2>&1; then as_root systemctl disable --now redis-server 2>/dev/null || true; fi
fi
for tool in pgrep setsid; do
  command -v "$tool" >/dev/null 2>&1 || { echo "start-redis: $tool is missing (procps, util-linux)" >&2; exit 1; }
done
ip=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')
# Beside, not inside, ~/.pdserve: in a container that folder is a mount point the user may not own.
dir="$HOME/pdserve-redis"
mkdir -p "$dir"
chmod 700 "$dir"

if [ -s "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
  kill "$(cat "$dir/redis.pid")"  # a second `ray up` restarts it with the current password
  for _ in $(seq 50); do kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null || break; sleep 0.1; done
fi
rm -f "$dir/redis.pid"
(
  umask 077
  cat > "$dir/redis.conf" <<CONF
bind $ip
port 6380
protected-mode yes
requirepass $password
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
kill -0 "$redis_pid"

# The watcher: waits (5 min at most) for the GCS `ray start` brings up next, then for it to go.
nohup setsid bash -c '
  for _ in $(seq 600); do pgrep -x gcs_server >/dev/null && break; sleep 0.5; done
  while pgrep -x gcs_server >/dev/null; do sleep 1; done
  echo "$(date -Is) Ray GCS gone: stopping redis-server $0"
  kill "$0"
' "$redis_pid" >>"$dir/watcher.log" 2>&1 < /dev/null &
