"""Pre-processing stage by stage, the full-decode path against the reduced-scale (``draft``) path, in one run.

For 640x480 and 4000x3000 JPEGs (seeded synthetic photos: smooth gradients plus noise, Pillow quality 90), the
default input (shorter side to 256, centre crop 224, bilinear), stage by stage: decode, resize, crop, to-array,
and the whole ``server.inference.preprocess.preprocess`` call. "full" decodes every pixel
(``load_source`` + ``fit``, the path before issue 16); "draft" is ``preprocess`` as served, which lets libjpeg
decode a large JPEG at 1/2, 1/4 or 1/8 scale (``draft_jpeg``). Rounds are interleaved (each round times every
stage of both paths once) and the medians are printed side by side with their ratio: compare figures within one
run only, the CPU under these machines changes between sessions.

Then the pixel difference of the draft path against the full decode, per size, interpolation and ``DRAFT_MARGIN``
(1, 2 and the served value), over several photos: mean absolute difference and 99th percentile, in 0..255 levels.

    python -m benchmarks.preprocess_stages
    python -m benchmarks.preprocess_stages --rounds 40 --photos 6 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.support import facts_block, fmt, markdown_table, run_facts
from server.core.manifest import InputSpec
from server.inference import preprocess as pre

SIZES = ((640, 480), (4000, 3000))
SPEC = InputSpec()
PARITY_SIZES = ((2048, 1536), (2736, 2048), (4000, 3000), (8000, 6000))
"""Photos whose 1/2 (or 1/4) decode is exactly or just over DRAFT_MARGIN times the resize target: the worst case."""


def photo(width: int, height: int, seed: int) -> bytes:
    """A synthetic photo as a quality-90 JPEG: gradients plus Gaussian noise (sigma 4..20 by seed)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 3 % 256], axis=-1)
    rng = np.random.default_rng(seed)
    base += rng.normal(0, 4 + 16 * (seed % 2), base.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def decoded(data: bytes, draft: bool) -> Image.Image:
    image = pre.open_input(data)
    assert isinstance(image, Image.Image)
    if draft:
        pre.draft_jpeg(image, SPEC)
    return pre.decode_image(image)


def resized(image: Image.Image) -> Image.Image:
    return image.resize(pre.scaled_size(image.width, image.height, SPEC), Image.Resampling.BILINEAR,
                        reducing_gap=pre.RESIZE_GAP)


def cropped(image: Image.Image) -> Image.Image:
    left, top = pre.crop_origin(image.width, image.height, SPEC)
    return image.crop((left, top, left + SPEC.width, top + SPEC.height))


def stages(data: bytes, draft: bool) -> dict[str, Callable[[], Any]]:
    """Each stage as a call on inputs prepared beforehand (so one stage's time excludes the others')."""
    image = decoded(data, draft)
    small = resized(image)
    crop = cropped(small)
    whole = (lambda: pre.preprocess(data, SPEC)) if draft else (lambda: pre.fit(pre.load_source(data, SPEC), SPEC))
    return {"decode": lambda: decoded(data, draft), "resize": lambda: resized(image),
            "crop 224": lambda: cropped(small), "to-array": lambda: np.asarray(crop), "preprocess()": whole}


def time_stages(datas: list[bytes], rounds: int) -> dict[tuple[str, str], float]:
    """Median ms per image of each (stage, path), rounds interleaved."""
    calls = {path: [stages(data, path == "draft") for data in datas] for path in ("full", "draft")}
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for stage in calls["full"][0]:
            for path, per_image in calls.items():
                start = time.perf_counter()
                for table in per_image:
                    table[stage]()
                samples.setdefault((stage, path), []).append((time.perf_counter() - start) * 1000 / len(datas))
    return {key: statistics.median(values) for key, values in samples.items()}


def parity(datas: list[bytes], margin: int, spec: InputSpec = SPEC) -> tuple[float, float, float, str]:
    """Mean, 99th percentile and maximum absolute difference of the draft path at ``margin`` against a full
    decode for ``spec``, and the decoded size."""
    served = pre.DRAFT_MARGIN
    pre.DRAFT_MARGIN = margin  # a measurement knob, restored below
    try:
        diffs, size = [], ""
        for data in datas:
            full = pre.fit(pre.load_source(data, spec), spec).astype(np.int16)
            diffs.append(np.abs(pre.preprocess(data, spec).astype(np.int16) - full).ravel())
            size = "x".join(map(str, decoded(data, True).size))
    finally:
        pre.DRAFT_MARGIN = served
    values = np.concatenate(diffs)
    return float(values.mean()), float(np.percentile(values, 99)), float(values.max()), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--photos", type=int, default=4, help="synthetic photos per size")
    parser.add_argument("--markdown", help="append the tables to this file")
    args = parser.parse_args()
    facts = run_facts("benchmarks.preprocess_stages")
    rows, parity_rows = [], []
    for width, height in SIZES:
        datas = [photo(width, height, seed) for seed in range(args.photos)]
        medians = time_stages(datas, args.rounds)
        for stage in ("decode", "resize", "crop 224", "to-array", "preprocess()"):
            full, draft = medians[(stage, "full")], medians[(stage, "draft")]
            rows.append([f"{width}x{height}", stage, fmt(full, 3), fmt(draft, 3), fmt(full / draft, 2)])
    for width, height in PARITY_SIZES:
        datas = [photo(width, height, seed) for seed in range(args.photos)]
        for interpolation in pre.DRAFT_FILTERS:
            spec = InputSpec(interpolation=interpolation)
            for margin in sorted({1, 2, pre.DRAFT_MARGIN}):
                mean, p99, peak, size = parity(datas, margin, spec)
                parity_rows.append([f"{width}x{height}", interpolation, margin, size, fmt(mean, 3), fmt(p99, 1),
                                    fmt(peak, 0)])
    text = "\n\n".join([
        facts_block(facts),
        markdown_table(["JPEG", "stage", "full decode ms", "draft path ms", "full / draft"], rows),
        markdown_table(["JPEG", "interpolation", "DRAFT_MARGIN", "decoded at", "mean abs diff", "p99 diff", "max diff"],
                       parity_rows)])
    print(text)
    if args.markdown:
        with Path(args.markdown).open("a", encoding="utf-8") as out:
            out.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
