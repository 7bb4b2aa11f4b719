#!/usr/bin/env bash
# What a lent GPU runs, in one call (~5 min on an H200): the CUDA tests (`pytest -m gpu`
# over the files that hold them), then benchmarks/gpu.py on Mistral Small 3's shape. Each part
# has a time limit, so a hang costs minutes, not the lease; logs go to $OUT (else here).
#
#   bash benchmarks/gpu_check.sh      # env: PYTHON, BANDWIDTH_GBS (4800: H200), GPU_ARGS,
#                                     # TEST_FILES (default: every file with CUDA tests)
#   GPU_ARGS="--scale 16 --device cpu" bash benchmarks/gpu_check.sh   # CPU smoke run
set -u
cd "$(dirname "$0")/.."
out=${OUT:-.}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export LEVANTE_QUANT_KERNEL=${LEVANTE_QUANT_KERNEL:-torch}  # no CPU kernel build on the GPU box
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
SECONDS=0
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
tests=${TEST_FILES:-tests/engine/test_on_cuda.py tests/engine/test_cuda_graphs.py \
    tests/quant/test_fp8.py tests/quant/test_triton_matmul.py}
timeout "${TEST_S:-170}" "$python" -m pytest -q -p no:randomly -m gpu -rs $tests 2>&1 | tee "$out/gpu-tests.log" | tail -40
echo "tests: ${SECONDS} s"
timeout "${BENCH_S:-330}" "$python" benchmarks/gpu.py --bandwidth-gbs "${BANDWIDTH_GBS:-4800}" \
    --deadline-s "${DEADLINE_S:-250}" ${GPU_ARGS---skip invariant,attention,graphs} 2>&1 | tee "$out/gpu-bench.log" | grep -v Warning
echo "total: ${SECONDS} s"
