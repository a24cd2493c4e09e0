#!/usr/bin/env bash
# Issue 6's device checks in one run on a lent GPU: build the extension, run the GPU tests, run the
# GPU benchmark. About 6-8 minutes on an H200 (the build is most of it). Results and logs go to
# $OUT (default benchmarks/results); commit the jsonl files with the device named in them.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, on the GPU machine
#
# The GPU machine has torch, transformers, pytest, ninja and nvcc but no network: the project is
# installed with --no-deps, which the tests run here do not need more than.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== build (arch $TORCH_CUDA_ARCH_LIST)"
  time CEE_GEN_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
  python3 -c "import cee_gen.ops.native as n; print('extension:', n.load())"
  echo "== GPU tests"
  python3 -m pytest -q -rs tests/test_ops.py tests/test_attention.py tests/test_placement.py 2>&1 | tail -25
  echo "== verify mode == full depth on the GPU (fp32, bf16)"
  python3 -m pytest -q -rs tests/test_verify.py -k cuda 2>&1 | tail -8
  echo "== GPU benchmark"
  python3 benchmarks/bench_gpu.py --shape llama2-7b --compile --out "$OUT/gpu_llama2-7b.jsonl"
  python3 benchmarks/bench_gpu.py --shape llama3-8b --out "$OUT/gpu_llama3-8b.jsonl"
  python3 benchmarks/bench_gpu.py --shape smollm2-135m --out "$OUT/gpu_smollm2-135m.jsonl"
} 2>&1 | tee "$LOG"
