#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N processes on localhost, each with D simulated CPU devices
# (or the real accelerators it is given), joined through jax.distributed.
#
#   launch/local_multiprocess.sh N D CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/local_multiprocess.sh 2 4 configs/tdd_tiny.py runs/tiny_2x4
#
# Process i logs to WORKDIR/process_i.log; the script waits for all and fails if any fails.
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 2,8p "$0" >&2; exit 2; }
nproc=$1 devices=$2 config=$3 workdir=$4
shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
mkdir -p "$workdir"
pids=()
for ((i = 0; i < nproc; i++)); do
  (cd "$here" && JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
     XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
     exec python3 -m tdd_jax.train --config="$config" --workdir="$workdir" --coordinator="localhost:$port" \
       --num_processes="$nproc" --process_id="$i" "$@") > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
