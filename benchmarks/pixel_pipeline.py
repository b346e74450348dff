"""The in-process pipeline on ONNX Runtime: float batches against uint8 batches normalised inside the graph.

For torchvision resnet18 and mobilenet_v3_small (random-init weights, never pretrained), 640x480 JPEGs (seeded
synthetic photos, quality 90, as in benchmarks/preprocess_stages.py), one thread doing what the daemon does for a
batch: decode + preprocess every image, then ``LoadedVersion.predict`` (normalisation, forward pass, softmax). Modes:

- ``torch``: eager PyTorch, served preprocessing (the reference of issue 16's targets);
- ``before``: ONNX Runtime on the graph as exported, fed by torch's float normalisation, with the preprocessing
  before issue 16 item 7 (the whole image scaled, then cropped);
- ``float``: the same float session with the served preprocessing (crop-box resize);
- ``uint8``: the session as served (server/inference/onnx_normalise.py): the stacked uint8 batch goes into the graph,
  which normalises it.

Each mode at each batch size also runs the forward pass alone (``predict`` on prepared arrays). The modes take
turns call by call and the median call is kept; ratios are within one run. The export goes through the loader's cache
(``--cache-dir``), so a second run does not export again.

    python -m benchmarks.pixel_pipeline --models mobilenet_v3_small --batch-sizes 1,8 --seconds 0.3
    python -m benchmarks.pixel_pipeline --seconds 5 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.cpu_bench import load_version
from benchmarks.preprocess_stages import before, decoded, photo
from benchmarks.support import emit, facts_block, fmt, markdown_table, run_facts, write_torchvision_model
from server.inference.preprocess import preprocess
from server.inference.runtime import LoadedVersion
from server.inference.runtimes import OnnxRuntime, Runtime, open_session
from server.models.loader import onnx

MODES = ("torch", "before", "float", "uint8")


def runtimes(version: LoadedVersion, version_dir: Path, cache_dir: Path) -> dict[str, Runtime]:
    """Each mode's runtime: eager, the plain exported graph (twice: before and float) and the served session."""
    path, _ = onnx.cached_export(version.module, version_dir, version.manifest, cache_dir)
    threads = torch.get_num_threads()
    plain = OnnxRuntime(open_session(path, threads, pixels=False), str(path))  # same options, no pixel input
    served = OnnxRuntime(open_session(path, threads), str(path))
    assert served.takes_pixels and not plain.takes_pixels
    eager = version.runtime
    assert eager is not None
    return {"torch": eager, "before": plain, "float": plain, "uint8": served}


def measure(version: LoadedVersion, modes: dict[str, Runtime], datas: list[bytes], sizes: list[int],
            seconds: float) -> dict[tuple[str, int, str], float]:
    """Images per second of each (mode, batch size, "pipeline" | "forward"): the modes take turns call by call
    (so a change in the host's load hits them alike) for ``seconds`` each, at least 3 calls; the median call."""
    times: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for size in sizes:
        batch = [datas[i % len(datas)] for i in range(size)]
        calls = {mode: cells(version, mode, batch) for mode in modes}
        for kind in ("pipeline", "forward"):
            for mode, runtime in modes.items():  # untimed: the first call at a new size allocates
                version.runtime = runtime
                calls[mode][kind]()
            deadline = time.perf_counter() + seconds * len(modes)
            while time.perf_counter() < deadline or len(times[next(iter(modes)), size, kind]) < 3:
                for mode, runtime in modes.items():
                    version.runtime = runtime
                    started = time.perf_counter()
                    calls[mode][kind]()
                    times[mode, size, kind].append(time.perf_counter() - started)
    return {key: int(key[1]) / statistics.median(values) for key, values in times.items()}


def cells(version: LoadedVersion, mode: str, batch: list[bytes]) -> dict[str, Callable[[], object]]:
    """The timed calls of one mode: the whole pipeline over ``batch`` and the forward pass on its arrays."""
    spec = version.manifest.input

    def prepare() -> list[np.ndarray]:
        if mode == "before":
            return [before(decoded(data, False)) for data in batch]
        return [preprocess(data, spec) for data in batch]

    arrays = prepare()
    return {"pipeline": lambda: version.predict(prepare()), "forward": lambda: version.predict(arrays)}


def table(arch: str, best: dict[tuple[str, int, str], float], sizes: list[int]) -> str:
    rows = []
    for kind in ("pipeline", "forward"):
        for size in sizes:
            rates = [best[mode, size, kind] for mode in MODES]
            rows.append([arch, kind, size, *(fmt(r, 1) for r in rates), fmt(rates[3] / rates[2], 2),
                         fmt(rates[3] / rates[1], 2), fmt(rates[3] / rates[0], 2)])
    return markdown_table(["model", "img/s of", "batch", *MODES, "uint8 / float", "uint8 / before", "uint8 / torch"],
                          rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per mode, batch size and kind")
    parser.add_argument("--photos", type=int, default=8, help="distinct 640x480 JPEGs")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "classifyd-bench-onnx")
    parser.add_argument("--markdown", help="append the tables to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.pixel_pipeline")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    datas = [photo(640, 480, seed) for seed in range(args.photos)]
    sections = [facts_block(facts) + f"\n- ONNX Runtime {ort.__version__}, {torch.get_num_threads()} intra-op threads"]
    with tempfile.TemporaryDirectory() as models:
        for arch in args.models.split(","):
            version_dir = write_torchvision_model(Path(models), arch, seed=0)
            version = load_version(version_dir, "cpu", max(sizes))
            best = measure(version, runtimes(version, version_dir, args.cache_dir), datas, sizes, args.seconds)
            sections.append(table(arch, best, sizes))
            print(sections[-1], flush=True)
    text = "\n\n".join(sections)
    emit(text + "\n", Path(args.markdown) if args.markdown else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
