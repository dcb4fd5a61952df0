#!/usr/bin/env bash
# Install tdd_jax and its dependencies on a fresh machine.
#   bash launch/install.sh          # CPU machine: CPU torch (local 2.13.0 build), project + test/convert/aot extras
#   bash launch/install.sh tpu      # TPU VM: jax[tpu], project + convert extras (torch from the CPU index)
#   bash launch/install.sh gpu      # CUDA machine: jax[cuda12], project + convert extras
# Idempotent: re-running only installs what is missing.
set -euo pipefail
target=${1:-cpu}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

bash "$here/launch/setup_system.sh"

pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

case "$target" in
  cpu)
    # A plain `torch` would pull several GB of CUDA wheels; 2.13.0 resolves to the CPU build here.
    "$py" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
    # aot: libtpu (~680 MB), so the tests can compile for TPU topologies (tdd_jax.compile_check) without a TPU.
    pip_install -e "$here[test,aot]" ;;
  tpu)
    pip_install torch --index-url https://download.pytorch.org/whl/cpu
    pip_install -e "$here[convert,tpu]" ;;
  gpu)
    pip_install torch --index-url https://download.pytorch.org/whl/cpu
    pip_install -e "$here[convert]" "jax[cuda12]" ;;
  *) echo "install.sh: unknown target '$target' (expected cpu, tpu or gpu)" >&2; exit 2 ;;
esac
