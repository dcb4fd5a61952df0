#!/usr/bin/env bash
# Run the trainer on every host of a Cloud TPU VM pod slice (one process per host, all started together).
#
#   launch/tpu_pod.sh setup NAME ZONE                      # copy this checkout to every host and install
#   launch/tpu_pod.sh train NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh stop  NAME ZONE                      # SIGTERM: each host saves at the agreed step, exits
#
# WORKDIR must be shared by all hosts (a gs:// bucket path): checkpoints are written by every host into it.
# The pipeline folder and data shards must be readable from every host (same path, e.g. a mounted disk or
# gs://). A preempted or stopped run resumes by running the same `train` command again.
set -euo pipefail
usage() { sed -n 2,11p "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=tdd_jax
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$action" in
  setup)
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$here" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name":tdd_jax.tar.gz --zone "$zone" --worker=all
    rm -f "$tarball"
    ssh_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf tdd_jax.tar.gz -C $remote_dir && \
             bash $remote_dir/launch/install.sh tpu" ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    overrides=$(printf ' %q' "$@")
    # --distributed=auto: JAX finds the coordinator, process count and index from the TPU metadata.
    ssh_all "cd $remote_dir && nohup python3 -m tdd_jax.train --config=$config --workdir=$workdir \
             --distributed=auto $overrides > train.log 2>&1 & echo \$! > train.pid; echo started on \$(hostname)" ;;
  stop)
    ssh_all "cd $remote_dir && kill -TERM \$(cat train.pid)" ;;
  *) usage ;;
esac
