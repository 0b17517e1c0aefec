#!/usr/bin/env bash
# The checks for a machine with one CUDA GPU, in under 5 minutes; run from the repository root:
#   bash benchmarks/gpu_check.sh            (PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh)
# 1. the GPU tests (pytest -m gpu): every estimator in float32 against float64 on the CPU, no host
#    sync in the training forward, torch.compile(fullgraph=True) with inductor, autocast float16 and
#    bfloat16, CUDA-graph capture of a training step, dcor² on the device, and the synced layers
#    with CUDA tensors over gloo with 2 processes on the one GPU (NCCL cannot put two ranks on it),
#    and the bias metrics (exact, projection, permutation, the accumulating class) on the device;
#    a skipped test prints as skipped (-rs), never as passed;
# 2. the layer against BatchNorm1d and the PyTorch floor at the four shapes of bench_layer.py on
#    CUDA: eager, torch.compile, and bfloat16 input under autocast.
set -u
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 2
status=0
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/nn/test_gpu.py tests/metrics/test_metrics_gpu.py tests/distributed/test_sync_cuda.py || status=1
timeout 110 "$PYTHON" benchmarks/bench_layer.py --device cuda --bf16 --rounds 15 --target 0.02 || status=1
exit $status
