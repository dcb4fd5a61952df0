#!/usr/bin/env bash
# The benchmark on a CUDA GPU, each run under its own time limit so that one slow compile cannot sink the others:
#   bash launch/benchmark_gpu.sh OUT_DIR
# 1. the default parts on the tiny pipeline (train step vs eager PyTorch, 4/8-step sampling vs diffusers + TCD);
# 2. one SDXL-architecture UNet forward at 1024² in bf16 (ours with XLA and cuDNN attention vs diffusers eager);
# 3. train step and 4-step sampling against torch.compile.
# Writes OUT_DIR/bench_gpu_{tiny,unet,compile}.{json,log}.
set -uo pipefail
out=${1:?usage: bash launch/benchmark_gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU's memory at start by default; leave PyTorch, in the same process, the other half.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
stage() {  # name, time limit in seconds, benchmark flags...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python3 -m launch.benchmark --device gpu --out "$out/bench_gpu_$name.json" "$@" \
    > "$out/bench_gpu_$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  grep -v "^[EW]0000\|^WARNING" "$out/bench_gpu_$name.log" | tail -40
}
stage tiny "${TINY_LIMIT:-150}" --parts train,sample,flops --repeats 5
stage unet "${UNET_LIMIT:-220}" --parts unet --repeats 5
stage compile "${COMPILE_LIMIT:-150}" --parts train,sample --steps 4 --repeats 5 --torch_compile
