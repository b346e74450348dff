"""Batch curves measured with the server's own autotune routine, and served throughput against them.

    python -m benchmarks.batch_curves                       # curves: digits, resnet18, mobilenet_v3_small
    python -m benchmarks.batch_curves --serve --seconds 10  # also serve each torchvision model with default
                                                            # settings and compare with its in-process best

Curves: each model is built with random-init weights (never downloaded) as a ``LoadedVersion`` and timed by
``server.models.loader.autotune.measure`` over the whole ladder (no early stop), on this process's main thread
with the thread
count the daemon would use. ``--serve`` then writes each torchvision model to a temporary repository with an
unpinned manifest, starts ``python -m server`` on it (so the daemon autotunes it), drives it closed-loop with
raw uint8 224×224 tensors from ``--concurrency`` asyncio clients, and reports served images/s as a share of the
best in-process throughput measured just before. Prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from safetensors.torch import save_file

from client import tensor_request
from server.batching.curve import BatchCurve, ladder
from server.core.manifest import load_manifest, parse_manifest
from server.inference.runtime import LoadedVersion
from server.models.loader.architectures import build_architecture
from server.models.loader.autotune import TunePlan, curve_from, measure, timed_predict
from server.models.loader.weights import build_model
from server.ops.host import apply_torch_threads

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits" / "1"
LABELS = tuple(f"class{i}" for i in range(1000))


def load(name: str, device: torch.device) -> LoadedVersion:
    """The default digits model from models/, or a random-init torchvision classifier. Blocks."""
    if name == "digits":
        manifest = load_manifest(DIGITS)
        module = build_model(DIGITS, manifest)
    else:
        manifest = parse_manifest({"architecture": f"torchvision:{name}"}, Path(f"<{name}>"), LABELS)
        module = build_architecture(manifest.architecture, len(LABELS), 3, {}).eval()
    return LoadedVersion(name, 1, manifest, module.to(device), device, max_batch_size=1, max_delay_ms=0.0)


def full_curve(version: LoadedVersion, ceiling: int, budget_s: float) -> BatchCurve:
    """The whole ladder up to ``ceiling`` (within ``budget_s``), the knee chosen as the daemon would."""
    version.warm_up()
    version.choose_threads_now()  # as the loader does after the warm-up

    async def time_batch(size: int) -> float:
        return timed_predict(version, size)  # on this thread: nothing else runs here

    samples, stopped = asyncio.run(measure(time_batch, ladder(ceiling), budget_s, stop_when_falling=False))
    return curve_from(samples, TunePlan(1, True, True, ceiling, budget_s), stopped)


def curve_table(name: str, curve: BatchCurve) -> str:
    rows = [f"**{name}** (knee: batch {curve.chosen}{'; ' + curve.stopped if curve.stopped else ''})", "",
            "| batch | ms per batch | images/s |", "| ---: | ---: | ---: |"]
    rows += [f"| {p.batch_size}{' ◀' if p.batch_size == curve.chosen else ''} | {p.batch_s * 1e3:.1f} | "
             f"{p.images_per_second:.1f} |" for p in curve.points]
    return "\n".join(rows)


def write_repository(root: Path, name: str) -> None:
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    (root / name / "model.toml").write_text(f'architecture = "torchvision:{name}"\n', encoding="utf-8")
    (root / name / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    module = build_architecture(f"torchvision:{name}", len(LABELS), 3, {})
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(version_dir / "model.safetensors"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(target: str, name: str, timeout_s: float = 300) -> pb.ModelInfo:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while time.monotonic() < deadline:
            try:
                info = stub.GetModel(pb.GetModelRequest(model=name), timeout=2)
                if info.serving_version:
                    return info
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"the daemon did not serve {name} within {timeout_s} s")


async def closed_loop(target: str, name: str, concurrency: int, warm_s: float, seconds: float) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    request = tensor_request(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8), model=name)
    latencies: list[float] = []
    batches: list[int] = []
    start = time.monotonic()
    begin, end = start + warm_s, start + warm_s + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def client() -> None:
            while (sent := time.monotonic()) < end:
                response = await stub.Classify(request, timeout=60)
                if sent >= begin:
                    latencies.append(time.monotonic() - sent)
                    batches.append(response.batch_size)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    ms = np.asarray(latencies) * 1e3
    return {"images_per_second": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_batch": float(np.mean(batches))}


def serve(name: str, args: argparse.Namespace) -> tuple[pb.ModelInfo, dict[str, float]]:
    """Serve ``name`` with default batching settings in a separate daemon process and load it closed-loop."""
    with tempfile.TemporaryDirectory() as tmp:
        write_repository(Path(tmp), name)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
        daemon = subprocess.Popen([sys.executable, "-m", "server", "--models-dir", tmp, "--port", str(port),
                                   "--device", args.device, "--no-watch", "--log-level", "WARNING",
                                   *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else [])],
                                  env=env)
        try:
            target = f"127.0.0.1:{port}"
            info = wait_ready(target, name)
            result = asyncio.run(closed_loop(target, name, args.concurrency, args.warm_s, args.seconds))
        finally:
            daemon.terminate()
            daemon.wait(60)
    return info, result


def served_line(name: str, curve: BatchCurve, info: pb.ModelInfo, result: dict[str, float], concurrency: int) -> str:
    best = max(curve.points, key=lambda p: p.images_per_second)
    served = result["images_per_second"]
    own = " ".join(f"{p.batch_size}:{p.images_per_second:.0f}" for p in info.batch_curve)
    return (f"served {name} with default settings: the daemon chose max_batch_size {info.max_batch_size} (its own "
            f"curve, size:images/s: {own}); {served:.1f} images/s at concurrency {concurrency} = "
            f"{served / best.images_per_second:.0%} of the best in-process {best.images_per_second:.1f} images/s "
            f"(batch {best.batch_size}); p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, mean batch "
            f"{result['mean_batch']:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_curves", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18", "mobilenet_v3_small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ceiling", type=int, default=64, help="largest batch size of the ladder (default: 64)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time per curve (default: 60)")
    parser.add_argument("--serve", action="store_true", help="also serve each torchvision model and load it")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warm-s", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="for the curves and the daemon (default: the daemon's rule, server/ops/host.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = apply_torch_threads(args.torch_threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, {threads} torch threads, device "
          f"{device}; load average {os.getloadavg()[0]:.1f}; command: python -m benchmarks.batch_curves "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}\n")
    for name in args.models:
        curve = full_curve(load(name, device), args.ceiling, args.budget_s)
        print(curve_table(name, curve), "\n")
        if args.serve and name != "digits":
            print(served_line(name, curve, *serve(name, args), args.concurrency), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
