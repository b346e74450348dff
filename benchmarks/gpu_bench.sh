#!/usr/bin/env bash
# classifyd on one CUDA GPU: the daemon against the in-process limit, in under 5 minutes.
#
#   benchmarks/gpu_bench.sh [MARKDOWN_FILE]      default: append to docs/benchmarks.md; "-" = stdout only
#
# Needs the project checkout and a Python with PyTorch + torchvision (CUDA build) plus the project's runtime
# packages: grpcio, grpcio-health-checking, grpcio-reflection, protobuf, pillow, numpy, safetensors, watchfiles.
# Nothing is installed or downloaded (weights are random-init). The JSON files go to $RESULTS_DIR
# (default /tmp/classifyd-gpu-bench). Runs (issue 5's GPU targets):
#   1. resnet50 from 640x480 JPEGs (q90), concurrency 1, 32, 256
#   2. resnet18 from raw uint8 224x224x3 tensors, concurrency 1, 32, 256
# each with the in-process limit measured first (same preprocessing and forward code, 16 preprocessing threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MARKDOWN=${1:-docs/benchmarks.md}
RESULTS_DIR=${RESULTS_DIR:-/tmp/classifyd-gpu-bench}
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS_DIR"

"$PYTHON" - <<'EOF' || exit 2
import importlib, sys
missing = []
for name in ("torch", "torchvision", "grpc", "grpc_health.v1", "grpc_reflection.v1alpha", "google.protobuf",
             "PIL", "numpy", "safetensors", "watchfiles", "classifier.v1.classifier_pb2", "server.app"):
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
EOF

markdown_args=()
[ "$MARKDOWN" != "-" ] && markdown_args=(--markdown "$MARKDOWN")
common=(--device cuda --concurrency 1,32,256 --batch-sizes 1,32,128,256 --inproc-seconds 3 --inproc-workers 16
        --setups batching --warmup 3 --duration 8 --client-processes 4)

"$PYTHON" -m benchmarks.cpu_bench "${common[@]}" "${markdown_args[@]}" --models resnet50 --payload jpeg \
    --json "$RESULTS_DIR/resnet50-jpeg.json" --title "GPU: resnet50 from 640x480 JPEGs (fp32, eager)"
"$PYTHON" -m benchmarks.cpu_bench "${common[@]}" "${markdown_args[@]}" --models resnet18 --payload tensor \
    --json "$RESULTS_DIR/resnet18-tensor.json" --title "GPU: resnet18 from raw uint8 224x224x3 tensors (fp32, eager)"
