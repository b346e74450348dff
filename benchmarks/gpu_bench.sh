#!/usr/bin/env bash
# classifyd on one CUDA GPU: the daemon against the in-process limit, in under 5 minutes.
#
#   benchmarks/gpu_bench.sh [MARKDOWN_FILE]      default: append to docs/benchmarks.md; "-" = stdout only
#
# Needs the project checkout and a Python with PyTorch + torchvision (CUDA build) plus the project's runtime
# packages: grpcio, grpcio-health-checking, grpcio-reflection, protobuf, pillow, numpy, safetensors, watchfiles.
# Nothing is installed or downloaded (weights are random-init). The JSON files go to $RESULTS_DIR
# (default /tmp/classifyd-gpu-bench). Runs, in about 5 minutes:
#   0. the CUDA tests (pinned staging, device JPEG decode, compiled buckets, out-of-memory split): pytest -k cuda
#   1. resnet50 bf16 + channels_last from 640x480 JPEGs (q90) decoded on the GPU, 4 daemon workers, c = 1, 32, 256
#   2. the same with PIL decoding on the CPU, c = 256 (what GPU decoding is worth)
#   3. resnet18 bf16 + channels_last from raw uint8 224x224x3 tensors, 4 daemon workers, c = 1, 32, 256
# each with the in-process limit measured first (same preprocessing and forward code, 16 preprocessing threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MARKDOWN=${1:-docs/benchmarks.md}
RESULTS_DIR=${RESULTS_DIR:-/tmp/classifyd-gpu-bench}
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS_DIR"

"$PYTHON" - <<'PY' || exit 2
import importlib, sys
missing = []
for name in ("torch", "torchvision", "grpc", "grpc_health.v1", "grpc_reflection.v1alpha", "google.protobuf",
             "PIL", "numpy", "safetensors", "watchfiles", "pytest", "classifier.v1.classifier_pb2", "server.daemon"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or protobuf's version check of the generated stubs
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("missing Python packages: " + ", ".join(missing) + "\ninstall the versions pinned in pyproject.toml, "
             "e.g. pip install grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 "
             "protobuf==7.36.2 watchfiles==1.3.0")
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: this script measures the GPU path")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)
PY

echo "== CUDA tests" >&2
"$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/inference/test_staging.py tests/inference/test_cuda_path.py \
    tests/inference/test_compile.py tests/daemon/test_production.py 2>&1 | tee "$RESULTS_DIR/cuda-tests.txt" | tail -n 15 >&2 || true

markdown_args=()
[ "$MARKDOWN" != "-" ] && markdown_args=(--markdown "$MARKDOWN")
common=(--device cuda --batch-sizes 1,32,128,256 --inproc-seconds 2 --inproc-workers 16 --setups batching
        --warmup 2 --duration 6 --client-processes 4 --daemon-flags "--workers 4"
        --manifest 'precision="bf16"' --manifest channels_last=true)

"$PYTHON" -m benchmarks.cpu_bench "${common[@]}" "${markdown_args[@]}" --models resnet50 --payload jpeg \
    --concurrency 1,32,256 --manifest 'input.decode="device"' --json "$RESULTS_DIR/resnet50-jpeg-gpu-decode.json" \
    --title "GPU: resnet50 bf16 from 640x480 JPEGs decoded on the GPU, 4 workers"
"$PYTHON" -m benchmarks.cpu_bench "${common[@]}" "${markdown_args[@]}" --models resnet50 --payload jpeg \
    --concurrency 256 --manifest 'input.decode="cpu"' --json "$RESULTS_DIR/resnet50-jpeg-cpu-decode.json" \
    --title "GPU: resnet50 bf16 from 640x480 JPEGs decoded by PIL on the CPU, 4 workers"
"$PYTHON" -m benchmarks.cpu_bench "${common[@]}" "${markdown_args[@]}" --models resnet18 --payload tensor \
    --concurrency 1,32,256 --json "$RESULTS_DIR/resnet18-tensor.json" \
    --title "GPU: resnet18 bf16 from raw uint8 224x224x3 tensors, 4 workers"
