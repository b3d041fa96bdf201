#!/usr/bin/env bash
# Install farm into ./.venv. `scripts/setup.sh test` also installs what the test suite needs.
# torch goes in first: on a machine without a GPU the CPU build (torch==2.13.0) is taken, so the
# project's torch range is satisfied without pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${pip[@]}" install -q "torch==${FARM_TORCH_VERSION:-2.13.0}"
fi
extras=""
if [ "${1:-}" = "test" ]; then
  extras="[test]"
  scripts/install-test-services.sh  # a real Prometheus for the observability tests
fi
"${pip[@]}" install -q -e ".${extras}"
# The example manifests' source clip (manifests/v2v.yaml): videos are made, never committed.
.venv/bin/python scripts/make_example_inputs.py
echo "farm installed in .venv (activate with: source .venv/bin/activate)"
